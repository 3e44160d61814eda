// The counter-based uniform draw u in [0, 1) of the sampler, bit-identical to
// cpu::uniform_from_counter. Host and device (the sampling kernel) share this one definition;
// plain C++ when not compiled by nvcc, so the bindings can include it.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PAGEDGPT2_HOST_DEVICE __host__ __device__
#else
#define PAGEDGPT2_HOST_DEVICE
#endif

namespace pagedgpt2::cuda {

PAGEDGPT2_HOST_DEVICE inline double uniform_from_counter(uint64_t seed, int64_t counter) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (uint64_t(counter) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return double(z >> 11) * 0x1.0p-53;
}

}  // namespace pagedgpt2::cuda

// Sampling on the GPU, one token per logits row, same semantics as cpu::sample
// (cpp/cpu/sampling.cpp): temperature 0 -> argmax (lowest id on ties); else logits / temperature,
// keep the top_k highest (0 = all), keep the shortest most-probable prefix reaching top_p, draw
// by inverse CDF over the kept tokens in descending order (ties: lower id) with
// u = uniform_from_counter(seed, counter). Only the token ids leave the GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/sampling_host.h"  // uniform_from_counter

namespace pagedgpt2::cuda {

// Per-row sampling parameters in device memory.
struct DeviceSampling {
  const float* temperature = nullptr;  // [R]
  const int32_t* top_k = nullptr;      // [R]
  const float* top_p = nullptr;        // [R]
  const uint64_t* seeds = nullptr;     // [R]
  const int64_t* counters = nullptr;   // [R]
};

// A token's key: its order among a row's tokens as one integer (larger key = earlier: the larger
// scaled logit, ties to the lower id, -0 tying with +0):
//   key = order_bits(logit) << 32 | (0xFFFFFFFF - id)
// So the greedy token of a row is the max of its keys, however the row is split: the batch-1 LM
// head reduces it with atomicMax as it writes the logits (SkinnyParams::argmax). 0 is below
// every key.
__device__ __forceinline__ uint32_t order_bits(float f) {
  const uint32_t u = __float_as_uint(f == 0.f ? 0.f : f);  // -0 ties with +0, as on the CPU
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long make_key(float logit, int id) {
  return (static_cast<unsigned long long>(order_bits(logit)) << 32) |
         (0xffffffffu - static_cast<uint32_t>(id));
}

__host__ __device__ __forceinline__ int key_id(unsigned long long key) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key));
}

// logits: rows of ld >= V values (In: float, or the model's half type straight from the LM head,
// which saves a widening pass); only the first V of a row are read. Rows sampled with a
// temperature are scaled into scratch, which may be logits itself when In is float and ld is V.
template <typename In>
void launch_sample(int32_t* next_tokens,  // [R]
                   const In* logits,      // [R, ld]
                   int ld,
                   float* scratch,        // [R, V]
                   const DeviceSampling& params, int num_rows, int vocab_size,
                   cudaStream_t stream,
                   bool pdl = false);  // programmatic launch (sm_90): the kernel waits for
                                       // the one before it (the LM head) at its first line

}  // namespace pagedgpt2::cuda

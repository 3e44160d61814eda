// What the test ops (ops.cu) and the hand-over timers (handover_bench.cu) share: their stream, a
// device array that frees itself, and the SM count their grids are sized by.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda::ops {

// Synchronous ops: the legacy default stream.
inline constexpr cudaStream_t kStream = 0;

template <typename T>
class DevArray {
 public:
  explicit DevArray(size_t n) : n_(n) {
    CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T)));
  }
  ~DevArray() { cudaFree(ptr_); }
  DevArray(const DevArray&) = delete;
  DevArray& operator=(const DevArray&) = delete;
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

inline int num_sms() {
  int device = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace pagedgpt2::cuda::ops

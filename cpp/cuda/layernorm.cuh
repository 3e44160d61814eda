// LayerNorm over the fp32 residual stream, with the residual add fused in front of it.
//
// NOTE: the residual stream stays in float32 whatever the model dtype (it is [T, C], tiny next to
// the weights): fp16 GPT-2 is known to drift or overflow when the stream is rounded every layer.
// LayerNorm statistics are float32 too; only the normalized output is rounded to T.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {

// One warp normalizes one fp32 row x (already final): store(c, y) receives
//   y = (x[c] - mean) / sqrt(var + eps) * w[c] + b[c]   for every c (each lane its own c's, so
// store may overwrite x[c] in place).
template <typename Store>
__device__ __forceinline__ void warp_layernorm_row(const float* x,  // [C]
                                                   const float* w,  // [C]
                                                   const float* b,  // [C]
                                                   int C, float eps, Store store) {
  const int lane = threadIdx.x % 32;
  float sum = 0.f;
  for (int c = lane; c < C; c += 32) sum += x[c];
  const float mean = warp_sum(sum) / C;
  float var = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float d = x[c] - mean;
    var += d * d;
  }
  const float rstd = 1.f / sqrtf(warp_sum(var) / C + eps);
  warp_write_row(C, [&](int c) { return (x[c] - mean) * rstd * w[c] + b[c]; }, store);
}

// ... into out in T.
template <typename T>
__device__ __forceinline__ void warp_layernorm_row(T* out,          // [C]
                                                   const float* x,  // [C]
                                                   const float* w,  // [C]
                                                   const float* b,  // [C]
                                                   int C, float eps) {
  warp_layernorm_row(x, w, b, C, eps, [&](int c, float y) { out[c] = from_float<T>(y); });
}

// For r < num_rows, with row = rows ? rows[r] : r:
//   residual[row] += delta[row]            (when delta is given)
//   out[r] = LayerNorm(residual[row])      (when out is given)
// rows gathers the final hidden states of the logits rows; delta adds a sublayer's output.
template <typename T>
void launch_add_layernorm(float* residual,       // [T, C] (in/out)
                          const T* delta,        // [T, C] or nullptr
                          T* out,                // [num_rows, C] or nullptr
                          const float* weight,   // [C]
                          const float* bias,     // [C]
                          const int32_t* rows,   // [num_rows] or nullptr
                          int num_rows, int C, float eps, cudaStream_t stream,
                          L2Range prefetch = {});  // asked of L2 for the next kernels

}  // namespace pagedgpt2::cuda

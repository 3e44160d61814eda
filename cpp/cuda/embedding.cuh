// Token + position embedding into the fp32 residual stream, fused with the first LayerNorm.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// residual[t] = wte[token_ids[t]] + wpe[positions[t]]; ln_out[t] = LayerNorm(residual[t]) when
// ln_out is given (the wide path feeds it to the first QKV GEMM; the skinny path normalizes in
// the GEMV itself and passes nullptr).
template <typename T>
void launch_embedding(float* residual,           // [T, C]
                      T* ln_out,                 // [T, C] or nullptr
                      const int32_t* token_ids,  // [T]
                      const int32_t* positions,  // [T]
                      const T* wte,              // [V, C]
                      const T* wpe,              // [P, C]
                      const float* ln_weight,    // [C]
                      const float* ln_bias,      // [C]
                      int num_tokens, int C, float eps, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

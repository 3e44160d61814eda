// Bias add and tanh-GELU as a standalone elementwise pass. The forward fuses both into the GEMM
// (cuBLASLt GELU_BIAS epilogue or the skinny GEMV's epilogue); this pass is the fallback when
// cuBLASLt offers no algorithm with that epilogue, and the `gelu` test op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// x[r, n] = act(x[r, n] + bias[n]), act = tanh-GELU when gelu else identity.
template <typename T>
void launch_bias_act(T* x,           // [rows, N]
                     const T* bias,  // [N] or nullptr
                     int64_t rows, int N, bool gelu, cudaStream_t stream);

// out[r, c] = float(in[r, c]): the half-precision LM head's logits widened for sampling, from
// rows padded to in_ld (>= cols) to packed rows.
template <typename T>
void launch_to_float(float* out,  // [rows, cols]
                     const T* in,  // [rows, in_ld]
                     int rows, int cols, int in_ld, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

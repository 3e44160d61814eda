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

}  // namespace pagedgpt2::cuda

// Embedding gather: one warp per token reads its wte and wpe rows, writes the fp32 residual row
// and, optionally, its LayerNorm (ln_1 of layer 0), saving a pass over the row.
#include "cuda/embedding.cuh"
#include "cuda/layernorm.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    embedding_kernel(float* residual,           // [T, C]
                     T* ln_out,                 // [T, C] or nullptr
                     const int32_t* token_ids,  // [T]
                     const int32_t* positions,  // [T]
                     const T* wte,              // [V, C]
                     const T* wpe,              // [P, C]
                     const float* ln_weight,    // [C]
                     const float* ln_bias,      // [C]
                     int num_tokens, int C, float eps) {
  pdl_launch_dependents();  // the first QKV GEMV may start streaming its weights
  const int t = blockIdx.x * kWarps + threadIdx.x / 32;
  if (t >= num_tokens) return;
  const T* te = wte + int64_t(token_ids[t]) * C;
  const T* pe = wpe + int64_t(positions[t]) * C;
  float* x = residual + int64_t(t) * C;
  warp_write_row(
      C, [&](int c) { return to_float(te[c]) + to_float(pe[c]); },
      [&](int c, float v) { x[c] = v; });
  if (ln_out) warp_layernorm_row(ln_out + int64_t(t) * C, x, ln_weight, ln_bias, C, eps);
}

}  // namespace

template <typename T>
void launch_embedding(float* residual, T* ln_out, const int32_t* token_ids,
                      const int32_t* positions, const T* wte, const T* wpe,
                      const float* ln_weight, const float* ln_bias, int num_tokens, int C,
                      float eps, cudaStream_t stream) {
  if (num_tokens <= 0) return;
  embedding_kernel<T><<<ceil_div(num_tokens, kWarps), kWarps * 32, 0, stream>>>(
      residual, ln_out, token_ids, positions, wte, wpe, ln_weight, ln_bias, num_tokens, C, eps);
  CUDA_CHECK_LAUNCH();
}

#define INSTANTIATE(T)                                                                        \
  template void launch_embedding<T>(float*, T*, const int32_t*, const int32_t*, const T*,     \
                                    const T*, const float*, const float*, int, int, float,    \
                                    cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace pagedgpt2::cuda

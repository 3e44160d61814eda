// LayerNorm kernels: residual add + LayerNorm.
//
// A block of 256 threads per row keeps the row in registers (C <= 2048: every GPT-2): one read of
// the residual and the delta, one write of each output, and two block reductions — so a row
// costs about one memory latency, not the three dependent passes of a warp walking the row.
// Wider rows fall back to a warp per row.
// NOTE: a block loads its LayerNorm weight and bias with the row, not after the reductions: as
// a dependent load at the end they cost a memory latency per row (batch 256: 82 -> 64 us a step
// over the 25 LayerNorms, H200).
#include "cuda/layernorm.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // C <= kThreads * kPerThread stays in registers
constexpr int kWarps = 8;      // fallback: rows per block, one warp each

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_layernorm_kernel(float* residual,      // [T, C]
                         const T* delta,       // [T, C] or nullptr
                         T* out,               // [num_rows, C] or nullptr
                         const float* weight,  // [C]
                         const float* bias,    // [C]
                         const int32_t* rows,  // [num_rows] or nullptr
                         int C, float eps, L2Range prefetch) {
  __shared__ float scratch[32];
  prefetch_l2_share(prefetch);
  float w[kPerThread], b[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * kThreads;
    w[i] = out && c < C ? weight[c] : 0.f;
    b[i] = out && c < C ? bias[c] : 0.f;
  }
  const int r = blockIdx.x;
  const int64_t row = rows ? rows[r] : r;
  float* x = residual + row * C;
  float v[kPerThread];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * kThreads;
    v[i] = 0.f;
    if (c < C) {
      v[i] = x[c] + (delta ? to_float(delta[row * C + c]) : 0.f);
      sum += v[i];
    }
  }
  if (delta) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = threadIdx.x + i * kThreads;
      if (c < C) x[c] = v[i];
    }
  }
  if (!out) return;  // uniform across the block
  const float mean = block_sum<kThreads>(sum, scratch) / C;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * kThreads;
    if (c < C) sq += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(block_sum<kThreads>(sq, scratch) / C + eps);
  T* y = out + int64_t(r) * C;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * kThreads;
    if (c < C) y[c] = from_float<T>((v[i] - mean) * rstd * w[i] + b[i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    add_layernorm_wide_kernel(float* residual, const T* delta, T* out, const float* weight,
                              const float* bias, const int32_t* rows, int num_rows, int C,
                              float eps, L2Range prefetch) {
  prefetch_l2_share(prefetch);
  const int r = blockIdx.x * kWarps + threadIdx.x / 32;
  if (r >= num_rows) return;
  const int64_t row = rows ? rows[r] : r;
  float* x = residual + row * C;
  if (delta) {
    const T* y = delta + row * C;
    for (int c = threadIdx.x % 32; c < C; c += 32) x[c] += to_float(y[c]);
  }
  if (out) warp_layernorm_row(out + int64_t(r) * C, x, weight, bias, C, eps);
}

}  // namespace

template <typename T>
void launch_add_layernorm(float* residual, const T* delta, T* out, const float* weight,
                          const float* bias, const int32_t* rows, int num_rows, int C, float eps,
                          cudaStream_t stream, L2Range prefetch) {
  if (num_rows <= 0) return;
  if (C <= kThreads * kPerThread) {
    add_layernorm_kernel<T><<<num_rows, kThreads, 0, stream>>>(residual, delta, out, weight, bias,
                                                                rows, C, eps, prefetch);
  } else {
    add_layernorm_wide_kernel<T><<<ceil_div(num_rows, kWarps), kWarps * 32, 0, stream>>>(
        residual, delta, out, weight, bias, rows, num_rows, C, eps, prefetch);
  }
  CUDA_CHECK_LAUNCH();
}

template void launch_add_layernorm<float>(float*, const float*, float*, const float*, const float*,
                                          const int32_t*, int, int, float, cudaStream_t, L2Range);
template void launch_add_layernorm<__half>(float*, const __half*, __half*, const float*,
                                           const float*, const int32_t*, int, int, float,
                                           cudaStream_t, L2Range);
template void launch_add_layernorm<__nv_bfloat16>(float*, const __nv_bfloat16*, __nv_bfloat16*,
                                                  const float*, const float*, const int32_t*, int,
                                                  int, float, cudaStream_t, L2Range);

}  // namespace pagedgpt2::cuda

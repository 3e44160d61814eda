// Elementwise bias + tanh-GELU (see activation.cuh for when it runs).
#include "cuda/activation.cuh"
#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {
namespace {

template <typename T>
__global__ void bias_act_kernel(T* x,           // [rows, N]
                                const T* bias,  // [N] or nullptr
                                int64_t n, int N, bool gelu) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = to_float(x[i]);
    if (bias) v += to_float(bias[i % N]);
    if (gelu) v = gelu_tanh(v);
    x[i] = from_float<T>(v);
  }
}

}  // namespace

template <typename T>
void launch_bias_act(T* x, const T* bias, int64_t rows, int N, bool gelu, cudaStream_t stream) {
  const int64_t n = rows * N;
  if (n <= 0) return;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((n + threads - 1) / threads, 65535));
  bias_act_kernel<T><<<blocks, threads, 0, stream>>>(x, bias, n, N, gelu);
  CUDA_CHECK_LAUNCH();
}

template void launch_bias_act<float>(float*, const float*, int64_t, int, bool, cudaStream_t);
template void launch_bias_act<__half>(__half*, const __half*, int64_t, int, bool, cudaStream_t);
template void launch_bias_act<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, int64_t, int,
                                             bool, cudaStream_t);

}  // namespace pagedgpt2::cuda

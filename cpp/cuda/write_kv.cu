// write_kv: one block per token copies its K and V rows (C elements each) to the cache slot, in
// 16-byte vectors when C allows.
#include "cuda/cuda_common.cuh"
#include "cuda/write_kv.cuh"

namespace pagedgpt2::cuda {
namespace {

template <typename T, int N>
__global__ void write_kv_kernel(T* k_cache,                   // [num_blocks, block_size, H, D]
                                T* v_cache,                   // [num_blocks, block_size, H, D]
                                const T* qkv,                 // [T, 3C]
                                const int32_t* slot_mapping,  // [T]
                                int C) {
  const int t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;
  const T* row = qkv + int64_t(t) * 3 * C;
  store_kv_row<T, N>(k_cache, v_cache, slot, C, 0, row + C, row + 2 * C, C / N, threadIdx.x,
                     blockDim.x);
}

}  // namespace

template <typename T>
void launch_write_kv(T* k_cache, T* v_cache, const T* qkv, const int32_t* slot_mapping,
                     int num_tokens, int C, cudaStream_t stream) {
  if (num_tokens <= 0) return;
  constexpr int kN = kVec16<T>;
  if (C % kN == 0) {
    write_kv_kernel<T, kN><<<num_tokens, 128, 0, stream>>>(k_cache, v_cache, qkv, slot_mapping, C);
  } else {
    write_kv_kernel<T, 1><<<num_tokens, 128, 0, stream>>>(k_cache, v_cache, qkv, slot_mapping, C);
  }
  CUDA_CHECK_LAUNCH();
}

template void launch_write_kv<float>(float*, float*, const float*, const int32_t*, int, int,
                                     cudaStream_t);
template void launch_write_kv<__half>(__half*, __half*, const __half*, const int32_t*, int, int,
                                      cudaStream_t);
template void launch_write_kv<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*,
                                             const __nv_bfloat16*, const int32_t*, int, int,
                                             cudaStream_t);

}  // namespace pagedgpt2::cuda

// copy_blocks: grid (num_copies, num_caches); each block moves one block of one cache in 16-byte
// words (block_bytes is a multiple of 16 whenever C * sizeof(T) is; else byte by byte).
#include "cuda/copy_blocks.cuh"
#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {
namespace {

template <typename W>
__global__ void copy_blocks_kernel(char* pool, int64_t cache_stride, int64_t block_bytes,
                                   const int32_t* src,  // [num_copies]
                                   const int32_t* dst)  // [num_copies]
{
  const int i = blockIdx.x, cache = blockIdx.y;
  char* base = pool + cache * cache_stride;
  const W* from = reinterpret_cast<const W*>(base + src[i] * block_bytes);
  W* to = reinterpret_cast<W*>(base + dst[i] * block_bytes);
  const int64_t n = block_bytes / int64_t(sizeof(W));
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) to[j] = from[j];
}

}  // namespace

void launch_copy_blocks(void* pool, int64_t cache_stride, int64_t block_bytes, int num_caches,
                        const int32_t* src, const int32_t* dst, int num_copies,
                        cudaStream_t stream) {
  if (num_copies <= 0) return;
  const dim3 grid(num_copies, num_caches);
  char* p = static_cast<char*>(pool);
  if (block_bytes % 16 == 0 && cache_stride % 16 == 0) {
    copy_blocks_kernel<uint4><<<grid, 256, 0, stream>>>(p, cache_stride, block_bytes, src, dst);
  } else {
    copy_blocks_kernel<char><<<grid, 256, 0, stream>>>(p, cache_stride, block_bytes, src, dst);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace pagedgpt2::cuda

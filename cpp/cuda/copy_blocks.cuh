// Copy-on-write of whole KV blocks, every layer, keys and values: one launch per step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// For every cache c in [0, num_caches) (the pool holds them back to back, cache_stride bytes
// apart: layer l's K is cache 2l, its V 2l+1) and every i: block dst[i] <- block src[i].
void launch_copy_blocks(void* pool,             // [num_caches, num_blocks, block_bytes]
                        int64_t cache_stride,   // bytes from one cache to the next
                        int64_t block_bytes,    // bytes of one block of one cache
                        int num_caches,
                        const int32_t* src,     // [num_copies] device
                        const int32_t* dst,     // [num_copies] device
                        int num_copies, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

// Writes each new token's key and value into its paged-cache slot.
// Layout (cpp/engine/model.h): k_cache, v_cache : [num_blocks, block_size, H, D]; a slot is
// block_id * block_size + offset, so a token's H*D values are contiguous at slot * C.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// k_cache[slot_mapping[t]] = qkv[t, C:2C], v_cache[...] = qkv[t, 2C:3C].
// A slot of -1 is padding: skipped.
template <typename T>
void launch_write_kv(T* k_cache,                  // [num_blocks, block_size, H, D]
                     T* v_cache,                  // [num_blocks, block_size, H, D]
                     const T* qkv,                // [T, 3C]
                     const int32_t* slot_mapping, // [T]
                     int num_tokens, int C, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

// Writes each new token's key and value into its paged-cache slot.
// Layout (cpp/engine/model.h): k_cache, v_cache : [num_blocks, block_size, H, D]; a slot is
// block_id * block_size + offset, so a token's H*D values are contiguous at slot * C.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {

// Thread t of n stores num_vecs N-element vectors of a token's key and value rows (k_row, v_row:
// in its qkv row) into cache slot `slot`, from column col0 on.
template <typename T, int N>
__device__ __forceinline__ void store_kv_row(T* k_cache, T* v_cache, int64_t slot, int C,
                                             int64_t col0, const T* k_row, const T* v_row,
                                             int num_vecs, int t, int n) {
  // NOTE: int64 offsets: slot * C exceeds 2^31 elements on a large pool.
  for (int i = t; i < num_vecs; i += n) {
    const int64_t dst = slot * C + col0 + int64_t(i) * N;
    *reinterpret_cast<Vec<T, N>*>(k_cache + dst) =
        *reinterpret_cast<const Vec<T, N>*>(k_row + int64_t(i) * N);
    *reinterpret_cast<Vec<T, N>*>(v_cache + dst) =
        *reinterpret_cast<const Vec<T, N>*>(v_row + int64_t(i) * N);
  }
}

// k_cache[slot_mapping[t]] = qkv[t, C:2C], v_cache[...] = qkv[t, 2C:3C].
// A slot of -1 is padding: skipped.
template <typename T>
void launch_write_kv(T* k_cache,                  // [num_blocks, block_size, H, D]
                     T* v_cache,                  // [num_blocks, block_size, H, D]
                     const T* qkv,                // [T, 3C]
                     const int32_t* slot_mapping, // [T]
                     int num_tokens, int C, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

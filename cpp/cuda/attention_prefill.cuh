// Prefill (varlen, causal) paged attention: ragged runs of query tokens per sequence attend to
// the sequence's cache through its block table, token t to positions [0, positions[t]]. Runs
// after write_kv, so a prompt chunk sees its own keys and any earlier chunks' (chunked prefill
// and prefix reuse work unchanged). Handles any head size up to 512 and any q_len, so it is also
// the fallback for decode batches with a head size the decode kernel has no template for.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// out[t, h*D:(h+1)*D] = softmax(q_t . K^T / sqrt(D)) V over positions [0, positions[t]].
template <typename T>
void launch_prefill_attention(T* out,                          // [T, H * D]
                              const T* qkv,                    // [T, 3 * H * D]
                              const T* k_cache,                // [num_blocks, block_size, H, D]
                              const T* v_cache,                // [num_blocks, block_size, H, D]
                              const int32_t* positions,        // [T]
                              const int32_t* query_start_loc,  // [S + 1]
                              const int32_t* block_tables,     // [S, max_blocks_per_seq]
                              int num_seqs, int max_blocks_per_seq, int num_heads, int head_size,
                              int block_size,
                              int max_query_len,  // longest run of queries of one sequence
                              cudaStream_t stream);

}  // namespace pagedgpt2::cuda

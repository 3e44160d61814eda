// CPU reference ops: the oracle every CUDA kernel is tested against, and the CPU backend itself.
// float32 throughout, row-major, host memory. Loops are written to vectorize and are split across
// threads with OpenMP where the work is large enough to pay for it.
#pragma once

#include <cstdint>

#include "engine/model.h"

namespace pagedgpt2::cpu {

// out[t, :] = (in[t, :] - mean) / sqrt(var + eps) * weight + bias
void layernorm(float* out,           // [T, C]
               const float* in,      // [T, C]
               const float* weight,  // [C]
               const float* bias,    // [C]
               int num_tokens, int channels, float eps);

// out = in @ weight^T (+ bias). weight is stored [N, K] (nn.Linear layout).
void matmul(float* out,           // [T, N]
            const float* in,      // [T, K]
            const float* weight,  // [N, K]
            const float* bias,    // [N] or nullptr
            int num_tokens, int out_features, int in_features);

// x = gelu_tanh(x), in place.
void gelu(float* x, int64_t n);

// x += y, in place.
void residual_add(float* x, const float* y, int64_t n);

// Writes each token's key and value into its cache slot. A slot of -1 means padding: skipped.
void write_kv(float* k_cache,              // [num_blocks, block_size, H, D]
              float* v_cache,              // [num_blocks, block_size, H, D]
              const float* qkv,            // [T, 3 * H * D]  (q | k | v)
              const int32_t* slot_mapping, // [T]
              int num_tokens, int num_heads, int head_size);

// Causal attention of every new token over its sequence's cached keys/values, walking the block
// table. Token t of sequence s attends to positions [0, positions[t]].
void paged_attention(float* out,                    // [T, H * D]
                     const float* qkv,              // [T, 3 * H * D] (only q is read)
                     const float* k_cache,          // [num_blocks, block_size, H, D]
                     const float* v_cache,          // [num_blocks, block_size, H, D]
                     const int32_t* positions,      // [T]
                     const int32_t* query_start_loc,// [S + 1]
                     const int32_t* block_tables,   // [S, max_blocks_per_seq]
                     int num_seqs, int max_blocks_per_seq, int num_heads, int head_size,
                     int block_size);

// One token per row of logits: greedy where temperature == 0, else temperature, top-k, top-p
// filtering and a draw from a counter-based generator keyed by (seed, counter).
void sample(int32_t* next_tokens,       // [R]
            float* logits,              // [R, V]  (scratch: scaled in place)
            const SamplingInputs& params, int num_rows, int vocab_size);

// Uniform draw in [0, 1) from (seed, counter): the same on every backend and thread.
double uniform_from_counter(uint64_t seed, int64_t counter);

}  // namespace pagedgpt2::cpu

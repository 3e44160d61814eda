// CPU paged attention: for every new token and head, a causal softmax over the sequence's cached
// keys, gathered block by block through the block table, then the weighted sum of the values.
// Two passes over a score buffer the size of the context (at most n_positions floats).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/ops.h"

namespace pagedgpt2::cpu {
namespace {

// Sequence index of every token of the batch.
std::vector<int> token_to_seq(const int32_t* query_start_loc, int num_seqs) {
  std::vector<int> seq_of(query_start_loc[num_seqs]);
  for (int s = 0; s < num_seqs; ++s) {
    for (int t = query_start_loc[s]; t < query_start_loc[s + 1]; ++t) seq_of[t] = s;
  }
  return seq_of;
}

void attend_one(float* out,                  // [D]
                const float* q,              // [D]
                const float* k_cache, const float* v_cache, const int32_t* block_table,
                int context_len, int head, int num_heads, int head_size, int block_size,
                std::vector<float>& scores) {
  const float scale = 1.f / std::sqrt(float(head_size));
  const int C = num_heads * head_size;
  scores.resize(context_len);
  float max_score = -INFINITY;
  for (int p = 0; p < context_len; ++p) {
    const int64_t slot = int64_t(block_table[p / block_size]) * block_size + p % block_size;
    const float* k = k_cache + slot * C + head * head_size;
    float dot = 0.f;
    for (int d = 0; d < head_size; ++d) dot += q[d] * k[d];
    scores[p] = dot * scale;
    max_score = std::max(max_score, scores[p]);
  }
  float sum = 0.f;
  for (int p = 0; p < context_len; ++p) {
    scores[p] = std::exp(scores[p] - max_score);
    sum += scores[p];
  }
  std::fill(out, out + head_size, 0.f);
  for (int p = 0; p < context_len; ++p) {
    const int64_t slot = int64_t(block_table[p / block_size]) * block_size + p % block_size;
    const float* v = v_cache + slot * C + head * head_size;
    const float w = scores[p] / sum;
    for (int d = 0; d < head_size; ++d) out[d] += w * v[d];
  }
}

}  // namespace

void paged_attention(float* out, const float* qkv, const float* k_cache, const float* v_cache,
                     const int32_t* positions, const int32_t* query_start_loc,
                     const int32_t* block_tables, int num_seqs, int max_blocks_per_seq,
                     int num_heads, int head_size, int block_size) {
  const int num_tokens = query_start_loc[num_seqs];
  const int C = num_heads * head_size;
  const std::vector<int> seq_of = token_to_seq(query_start_loc, num_seqs);
  const int64_t num_items = int64_t(num_tokens) * num_heads;
#pragma omp parallel if (num_items > 4)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < num_items; ++item) {
      const int t = int(item / num_heads), h = int(item % num_heads);
      const int32_t* table = block_tables + int64_t(seq_of[t]) * max_blocks_per_seq;
      attend_one(out + size_t(t) * C + h * head_size, qkv + size_t(t) * 3 * C + h * head_size,
                 k_cache, v_cache, table, positions[t] + 1, h, num_heads, head_size, block_size,
                 scores);
    }
  }
}

}  // namespace pagedgpt2::cpu

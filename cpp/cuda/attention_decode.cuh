// Paged-attention decode: one query token per sequence attends to its whole cached context,
// walking the block table. Reads K/V from the cache after write_kv (or the fused QKV epilogue),
// or does write_kv itself (slot_mapping given): the new token's K/V then come from qkv.
//
// Work split: a thread block per (group of heads, sequence, partition); a partition is
// `partition_size` consecutive context tokens. A block covers one head with all its warps, or
// four heads with a warp each (large batches: a block then reads a contiguous run of four heads'
// rows per token, and pays its fixed costs once for four heads). With one partition per
// sequence it is a single pass; with several (few sequences x heads, or long contexts) each
// block writes a partial (max, sum, unnormalized output) and the last block of a (sequence,
// head) to finish merges them (flash-decoding, with the reduce fused: no second launch). The
// grid is sized from an upper bound on the context so a CUDA graph can replay it for any context
// up to that bound; blocks past a sequence's context return at once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {

// Scratch of the split path, sized once by the model. Partition p of head h of sequence s is
// row (s * H + h) * max_partitions + p, max_partitions = decode_num_partitions(max_context_len,
// partition_size) of the launch.
struct DecodeWorkspace {
  float* partial_out = nullptr;    // [capacity_rows, D]  (row = (s * H + h) * max_partitions + p)
  float* partial_max = nullptr;    // [capacity_rows]
  float* partial_sum = nullptr;    // [capacity_rows]
  unsigned* counters = nullptr;    // [S * H], zero between launches (the merging block resets it)
  int64_t capacity_rows = 0;
  int64_t capacity_counters = 0;
};

// Heads per thread block for a batch of num_seqs (1 or 4).
int decode_heads_per_block(int num_seqs, int num_heads, int num_sms);

// How many partitions a context of max_context_len is split into (non-decreasing in
// max_context_len: the model sizes DecodeWorkspace with it at n_positions), and the partition
// length that gives (tokens per thread block, a multiple of 64).
int decode_partition_count(int num_seqs, int num_heads, int max_context_len, int num_sms,
                           int heads_per_block);
int decode_partition_size(int num_seqs, int num_heads, int max_context_len, int num_sms,
                          int heads_per_block);
inline int decode_num_partitions(int max_context_len, int partition_size) {
  return (max_context_len + partition_size - 1) / partition_size;
}

// Flash-decoding's merge of one head's partitions (workspace rows first .. first + num_parts -
// 1), shared by the attention kernel's last partition (merge_partitions) and the proj GEMV that
// merges them while it stages x (SkinnyInput::kAttentionPartials). For the N output elements
// from column col of the partial rows: o = sum_p w_p o_p, returned l = sum_p w_p l_p, w_p =
// exp2(max_p - max over p); the caller normalizes (o / l). The loads of B partitions (max, sum
// and output) go out together: one L2 round trip a batch, merged online, batch after batch.
template <int N, int B>
__device__ __forceinline__ float merge_partials(const DecodeWorkspace& ws, int64_t first,
                                                int num_parts, int D, int col, float (&o)[N]) {
  static_assert(N == 1 || N == 4, "a float or a float4 of each partial row");
  float m = -INFINITY, l = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = 0.f;
  for (int p0 = 0; p0 < num_parts; p0 += B) {
    float pm[B], pl[B], po[B][N];
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const bool here = p0 + j < num_parts;
      const int64_t row = first + p0 + j;
      pm[j] = here ? __ldcg(ws.partial_max + row) : -INFINITY;
      pl[j] = here ? __ldcg(ws.partial_sum + row) : 0.f;
      const float* src = ws.partial_out + row * D + col;
      if constexpr (N == 4) {
        const float4 v = here ? __ldcg(reinterpret_cast<const float4*>(src))
                              : make_float4(0.f, 0.f, 0.f, 0.f);
        po[j][0] = v.x, po[j][1] = v.y, po[j][2] = v.z, po[j][3] = v.w;
      } else {
        po[j][0] = here ? __ldcg(src) : 0.f;
      }
    }
    float m_new = m;
#pragma unroll
    for (int j = 0; j < B; ++j) m_new = fmaxf(m_new, pm[j]);
    const float a = m == -INFINITY ? 0.f : exp2f(m - m_new);
    l *= a;
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] *= a;
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const float w = pm[j] == -INFINITY ? 0.f : exp2f(pm[j] - m_new);
      l += pl[j] * w;
#pragma unroll
      for (int i = 0; i < N; ++i) o[i] += po[j][i] * w;
    }
    m = m_new;
  }
  return l;
}

// Head sizes with a compiled decode kernel; others run the prefill kernel (which handles q_len 1).
bool decode_attention_supported(int head_size, int elem_size);

// out[s, h*D:(h+1)*D] = softmax(q . K^T / sqrt(D)) V over the first context_lens[s] cached
// tokens of sequence s (q = qkv[s, h*D:(h+1)*D]). context_lens[s] == 0: padding, out row zeroed.
// slot_mapping given: K/V of token context_lens[s] - 1 (row s of qkv) are written to cache slot
// slot_mapping[s] (-1: not written) by this kernel, as write_kv would; nullptr: already there.
// Either way that token's K/V are read from qkv (the caller guarantees they are its cache row's),
// so that with pdl every other row can be copied before the kernel waits.
template <typename T>
void launch_decode_attention(T* out,                       // [S, H * D]
                             const T* qkv,                 // [S, 3 * H * D]
                             T* k_cache,                   // [num_blocks, block_size, H, D]
                             T* v_cache,                   // [num_blocks, block_size, H, D]
                             const int32_t* context_lens,  // [S]
                             const int32_t* block_tables,  // [S, max_blocks_per_seq]
                             const int32_t* slot_mapping,  // [S] or nullptr
                             int num_seqs, int max_blocks_per_seq, int num_heads, int head_size,
                             int block_size,
                             int max_context_len,  // >= every context_lens[s]: sizes the grid
                             int partition_size,   // from decode_partition_size
                             int heads_per_block,  // from decode_heads_per_block
                             const DecodeWorkspace& ws, cudaStream_t stream,
                             bool pdl = false,  // programmatic dependent launch (sm_90), as
                                                // launch_skinny_gemm's: before it waits, the
                                                // kernel reads the step inputs and starts
                                                // copying the cache rows of older tokens
                             L2Range prefetch = {},  // asked of L2 for the next kernels
                             // Every block writes its partial (max, sum, unnormalized output
                             // row into ws) and none merges: the proj GEMV merges them while it
                             // stages its x (SkinnyInput::kAttentionPartials). out is not written.
                             bool merge_later = false);

}  // namespace pagedgpt2::cuda

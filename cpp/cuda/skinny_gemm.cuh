// The skinny GEMM: out = x @ W^T for a handful of rows (decode at small batch), where the cost is
// streaming W once and the fixed cost of each launch. Instead of cuBLAS it is a weight-streaming
// GEMV with the work around the product fused in:
//   prologue: the fp32 residual rows (optionally gathered by x_rows) times the LayerNorm weight,
//             their mean and variance summed on the way (the rest of the LayerNorm is folded
//             into the epilogue), a plain activation in T, or decode attention's partitions
//             merged (its last step, moved here from the attention kernel);
//   epilogue: + bias, + bias then GELU, residual += (+ bias), + bias with the K/V columns also
//             written to their paged-cache slots (QKV + write_kv), or float32 logits (with,
//             optionally, each row's greedy token reduced on the way: SkinnyParams::argmax).
// NOTE: with programmatic dependent launch (pdl) the weight prefetch of a GEMV overlaps the tail
// of the kernel before it; the weights never depend on earlier kernels.
// So a decode layer is 5 launches: ln_1+QKV+write_kv, attention, proj+residual,
// ln_2+fc+GELU, fc_proj+residual.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_decode.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/dtype.h"

namespace pagedgpt2::cuda {

constexpr int kSkinnyMaxRows = 8;

enum class SkinnyInput {
  kActivation,  // x: T [rows, K]
  kLayerNorm,   // x: float [*, K] (the residual stream), normalized with ln_weight and ln_fold
  // x row m: sequence m's decode-attention output (K = H * D), merged from the partitions that
  // launch_decode_attention(..., merge_later) left in `partials` (flash-decoding's reduce).
  // Only where skinny_merges_attention(rows, K).
  kAttentionPartials,
};

enum class SkinnyOutput {
  kBias,          // out: T [rows, N] = y + bias
  kBiasGelu,      // out: T [rows, N] = gelu(y + bias)
  kBiasResidual,  // out: float [rows, N] += y + bias
  kBiasQkv,       // out: T [rows, 3C] = y + bias; columns [C, 3C) also to k/v cache slots
  kLogits,        // out: float [rows, N] = y (no bias)
};

template <typename T>
struct SkinnyParams {
  const void* x = nullptr;            // see SkinnyInput
  const int32_t* x_rows = nullptr;    // [rows]: product row m reads x row x_rows[m]; nullptr = m
  // kLayerNorm: LayerNorm(x) W^T + bias, as rstd * (((x - x0) * ln_weight) W^T - (mean - x0) * s)
  // + c (x0: the row's first element), with s = W ln_weight and c = W ln_bias + bias from
  // launch_fold_layernorm (ln_bias and bias are not read).
  const float* ln_weight = nullptr;   // [K] (kLayerNorm)
  const float* ln_fold = nullptr;     // [2, N]: s, then c (kLayerNorm)
  float eps = 1e-5f;
  // kAttentionPartials: the partials, and what says where they lie (see DecodeWorkspace): the
  // sequences' context lengths (0: padding, x row 0), the launch's partition size and count.
  DecodeWorkspace partials;
  const int32_t* context_lens = nullptr;  // [rows]
  int partition_size = 0, max_partitions = 0, head_size = 0;
  const T* weight = nullptr;          // [N, K]
  const T* bias = nullptr;            // [N] (kActivation; unused by kLogits)
  void* out = nullptr;                // see SkinnyOutput
  T* k_cache = nullptr;               // kBiasQkv: [num_blocks, block_size, H, D]
  T* v_cache = nullptr;               // kBiasQkv: [num_blocks, block_size, H, D]
  const int32_t* slot_mapping = nullptr;  // kBiasQkv: [rows], -1 = padding (not written)
  int rows = 0, N = 0, K = 0;
  // Warps sharing each output row (splitting K): 1, 2, 4 or 8; 0 = picked per launch.
  int warps_per_row = 0;
  // kLogits after kLayerNorm (the LM head): where each product row's greedy token is reduced
  // as its logits are written: the max of the row's keys (make_key in sampling.cuh) by
  // atomicMax, so [rows] zeros before the launch (whoever reads the keys resets them).
  // nullptr: not reduced.
  unsigned long long* argmax = nullptr;
  // At one row, where the shape allows (skinny_resident_rows): at most one block an SM,
  // each with all of its weights loaded into registers before pdl_wait, and small enough that
  // the next kernel's blocks are resident beside it. Otherwise (or false) the streaming kernel.
  bool resident = false;
  // Asked of L2 by the blocks together, after their first weight loads and before waiting on
  // the previous kernel (the weights of the GEMVs after this one; never waited for).
  L2Range prefetch;
};

// Whether the skinny kernel takes a product of `rows` rows over K inputs: rows <= 8, K a
// multiple of 8 (16-byte weight loads) and x fitting shared memory.
bool skinny_gemm_supported(int rows, int K);

// Whether a skinny GEMV of `rows` rows over K = H * D inputs should merge decode attention's
// partitions itself (kAttentionPartials): only while each thread stages one vector of x. Every
// block reads every partition, so the bytes grow with rows x K x partitions, and a thread's
// vectors go one round trip at a time.
// NOTE: measured (H200, 128 + 128 tokens, PAGEDGPT2_MERGE_IN_PROJ=0 against 1 in one process):
// gpt2 batch 1 (one vector a thread) 0.245 -> 0.233 ms a step; two vectors a thread: gpt2
// batch 2 0 to +1%, gpt2-xl batch 1 -1.4 to +0.4%; four: gpt2-xl batch 2 2.333 -> 2.466 ms.
bool skinny_merges_attention(int rows, int K);

// Warps a row (splitting K) of the streaming kernel for an [N, K] weight of elem_bytes-byte
// elements on num_sms SMs, where SkinnyParams::warps_per_row is 0: doubled from 1 (up to 8)
// while the row groups number fewer than 2 an SM and each warp keeps >= 64 vectors of a row.
int skinny_warps_per_row(int N, int K, int elem_bytes, int num_sms);

// Rows a warp of the resident GEMV (SkinnyParams::resident) for one row of x times an [N, K]
// weight of elem_bytes-byte elements on num_sms SMs; 0 where the streaming kernel runs instead.
// Built for 16-bit types and the K of gpt2 and gpt2-medium (768, 1,024, 3,072, 4,096); R is the
// fewest rows a warp (1, 3 or 4) that keep to ceil(N / (8 R)) <= num_sms blocks.
int skinny_resident_rows(int N, int K, int elem_bytes, int num_sms);

// pdl: launch with programmatic stream serialization (sm_90): the kernel streams its first
// weights while the previous kernel finishes, then waits for it before reading x. Only valid
// when the previous kernel in the stream is an ordinary kernel or another skinny GEMM.
template <typename T>
void launch_skinny_gemm(const SkinnyParams<T>& p, SkinnyInput input, SkinnyOutput output,
                        int num_sms, cudaStream_t stream, bool pdl = false);

// The LayerNorm folded into a GEMV over W [N, K] (SkinnyParams::ln_fold): fold [2, N] =
// (W ln_weight, W ln_bias + bias), in float32 from W's elements as stored. bias may be nullptr.
// Run once per weight, at load time.
template <typename T>
void launch_fold_layernorm(float* fold, const T* weight, const float* ln_weight,
                           const float* ln_bias, const T* bias, int N, int K,
                           cudaStream_t stream);

}  // namespace pagedgpt2::cuda

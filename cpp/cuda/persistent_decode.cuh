// Persistent decode: a whole decode step at batch 1-2 (every layer and the LM head) as ONE kernel.
//
// Why: at batch 1 the layered path is ~60 dependent kernels (5 per layer); each costs a few µs of
// launch, ramp and tail while its weights stream in well under a µs. Here one thread block per SM
// lives for the whole step and the stages of a layer are separated by grid-wide barriers:
//   ln_1 + QKV (+ K/V into the paged cache) | attention | proj + residual | ln_2 + fc + GELU |
//   fc_proj + residual | ... next layer ... | ln_f + LM head (float32 logits)
// Weights never depend on activations, so a producer warp per block streams its share of every
// stage's weight rows (a contiguous byte range of W) into a shared-memory ring with Hopper bulk
// copies (TMA), running ahead across barriers; the consumer warps take rows out of the ring.
// Attention: a warp per 32 tokens of a (row, head) over the block table, planned once per step;
// the partitions merge in shared memory (a block per (row, head), contexts <= 256) or through
// global scratch (flash-decoding).
// sm_90 only (bulk copies, mbarrier transaction counts); other GPUs keep the layered path.
//
// STATUS: opt-in (PAGEDGPT2_PERSISTENT=1), because on an H200 it is still slower than the
// layered path: gpt2 batch 1 0.54 against 0.43 ms a step, gpt2-xl 2.91 against 2.71 ms.
// tools/persistent_trace.py splits a step by stage; docs/notes.md (fifth session) has the
// measurements and what is left (attention ~15 µs a layer, barriers ~1-2 µs each).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// One layer's tensors, as the kernel reads them (an array of these lives in device memory).
template <typename T>
struct DecodeLayerWeights {
  const float* ln_1_w;  // [C]
  const float* ln_1_b;  // [C]
  const T* qkv_w;       // [3C, C]
  const T* qkv_b;       // [3C]
  const T* proj_w;      // [C, C]
  const T* proj_b;      // [C]
  const float* ln_2_w;  // [C]
  const float* ln_2_b;  // [C]
  const T* fc_w;        // [I, C]
  const T* fc_b;        // [I]
  const T* fc_proj_w;   // [C, I]
  const T* fc_proj_b;   // [C]
  T* k_cache;           // [num_blocks, block_size, H, D]
  T* v_cache;           // [num_blocks, block_size, H, D]
};

// Scratch the kernel keeps between launches; counters and barrier are zero between launches
// (the kernel leaves them so).
struct PersistentScratch {
  float* part_out = nullptr;          // [rows * H * kPersistentMaxParts, D] unnormalized
  float* part_max = nullptr;          // [rows * H * kPersistentMaxParts]
  float* part_sum = nullptr;          // [rows * H * kPersistentMaxParts]
  unsigned* part_counters = nullptr;  // [rows * H] partitions finished
  unsigned* barrier = nullptr;        // [kPersistentBarrierWords] grid barrier (3 cache lines)
  // Optional: [blocks, 10 L + 2] clock64 marks of consumer thread 0 at every stage boundary
  // (PAGEDGPT2_PERSISTENT_TRACE, for tuning).
  long long* trace = nullptr;
};

template <typename T>
struct PersistentDecodeParams {
  const DecodeLayerWeights<T>* layers = nullptr;  // [L] (device memory)
  const T* wte = nullptr;                         // [V, C] (also the LM head)
  const T* wpe = nullptr;                         // [P, C]
  const float* ln_f_w = nullptr;                  // [C]
  const float* ln_f_b = nullptr;                  // [C]
  int L = 0, C = 0, I = 0, H = 0, V = 0, P = 0;   // head size C / H is 64
  float eps = 1e-5f;
  int block_size = 0, max_blocks = 0;             // KV blocks; block-table width
  // Step inputs (device), one token per sequence (row).
  const int32_t* token_ids = nullptr;       // [rows]
  const int32_t* positions = nullptr;       // [rows]
  const int32_t* slot_mapping = nullptr;    // [rows], -1 = padding
  const int32_t* context_lens = nullptr;    // [rows], 0 = padding
  const int32_t* block_tables = nullptr;    // [rows, max_blocks]
  const int32_t* logits_indices = nullptr;  // [num_logits] rows whose logits are computed
  int num_logits = 0;
  // Activations (device).
  float* residual = nullptr;  // [rows, C]
  T* qkv = nullptr;           // [rows, 3C]
  T* attn = nullptr;          // [rows, C]
  T* mlp = nullptr;           // [rows, I]
  float* logits = nullptr;    // [num_logits, V]
  PersistentScratch scratch;
};

constexpr int kPersistentMaxRows = 2;
constexpr int kPersistentBarrierWords = 64;

// Attention partitions of one (row, head): 32 tokens each, so contexts up to 1024.
constexpr int kPersistentMaxParts = 32;

// Whether the kernel runs this model here: sm_90+, head size 64, max_positions <= 1024, rows of
// W in 16-byte vectors and a ring of at least two weight rows beside the activations in shared
// memory.
bool persistent_decode_supported(int C, int I, int H, int max_positions, int elem_size,
                                 int device);

// The step over `rows` (1 or 2) sequences, one new token each: residual, caches and logits
// updated as the layered path does. One cooperative launch of one block per SM.
template <typename T>
void launch_persistent_decode(const PersistentDecodeParams<T>& p, int rows, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

// Every CUDA kernel as a host function over float32 host arrays, for the kernel tests
// (tests/gpu/test_kernels.py) through pagedgpt2._cuda.ops. Each op casts its float32 inputs to
// `dtype` on the device, runs the kernel on device 0's current device, and returns float32. Same
// argument order as the CPU reference ops (cpp/cpu/ops.h). Plain C++: the bindings include it.
#pragma once

#include <cstdint>

#include "cuda/dtype.h"
#include "engine/model.h"

namespace pagedgpt2::cuda::ops {

void layernorm(float* out,           // [T, C]
               const float* in,      // [T, C]
               const float* weight,  // [C]
               const float* bias,    // [C]
               int num_tokens, int channels, float eps, DType dtype);

// The model's add+LayerNorm (launch_add_layernorm): for r < num_rows, row = rows ? rows[r] : r,
//   residual[row] += delta[row] (delta rounded to dtype; when delta is given), then
//   out[r] = LayerNorm(residual[row]) in dtype (when out is given).
// residual stays float32, as the model's residual stream. C > 2048 takes the warp-per-row kernel.
void add_layernorm(float* residual,       // [T, C] (in/out)
                   const float* delta,    // [T, C] or nullptr
                   float* out,            // [num_rows, C] or nullptr
                   const float* weight,   // [C] (with out)
                   const float* bias,     // [C] (with out)
                   const int32_t* rows,   // [num_rows] or nullptr
                   int num_tokens, int num_rows, int channels, float eps, DType dtype);

// The embedding gather (launch_embedding): residual[t] = wte[token_ids[t]] + wpe[positions[t]]
// (tables rounded to dtype), and ln_out[t] = LayerNorm(residual[t]) in dtype when ln_out is given.
void embedding(float* residual,           // [T, C]
               float* ln_out,             // [T, C] or nullptr
               const int32_t* token_ids,  // [T]
               const int32_t* positions,  // [T]
               const float* wte,          // [V, C]
               const float* wpe,          // [P, C]
               const float* ln_weight,    // [C] (with ln_out)
               const float* ln_bias,      // [C] (with ln_out)
               int num_tokens, int vocab_size, int num_positions, int channels, float eps,
               DType dtype);

// The decode-run step advance (launch_advance_decode_step), on copies of the arrays: every
// array is read, advanced in place and returned; *run_step is the run's step counter.
void advance_decode_step(int32_t* token_ids,          // [S]
                         int32_t* positions,          // [S]
                         int32_t* slot_mapping,       // [S]
                         int32_t* context_lens,       // [S]
                         int64_t* counters,           // [S] or nullptr
                         int32_t* history,            // [steps, S]
                         int32_t* next_tokens,        // [S]
                         const int32_t* next_slots,   // [steps, S]
                         int32_t* run_step, int num_rows, int num_steps,
                         // [S] or nullptr: the LM head's greedy keys, read and reset to 0
                         uint64_t* greedy_keys = nullptr,
                         // The next step's x (NextEmbedding), if residual is given:
                         float* residual = nullptr,    // [S, channels] out
                         const float* wte = nullptr,   // [vocab_size, channels]
                         const float* wpe = nullptr,   // [num_positions, channels]
                         int vocab_size = 0, int num_positions = 0, int channels = 0,
                         DType dtype = DType::kFloat32);

// cuBLASLt: out = in @ weight^T (+ bias), then tanh-GELU when gelu (bias required then).
void matmul(float* out,           // [T, N]
            const float* in,      // [T, K]
            const float* weight,  // [N, K]
            const float* bias,    // [N] or nullptr
            int num_tokens, int out_features, int in_features, bool gelu, DType dtype);

// The skinny GEMV (T <= 8): out = [gelu](LN?(in) @ weight^T + bias) [+ residual].
//   ln_weight/ln_bias given: `in` is float32 and normalized in the kernel (else cast to dtype);
//   bias nullptr: float32 logits, no bias; residual given: out = residual + in @ W^T + bias.
//   greedy_tokens given (logits only): each row's greedy token as the kernel reduces it on the
//   way (SkinnyParams::argmax).
//   resident: at one row, the resident variant where skinny_resident_rows takes the shape.
void skinny_matmul(float* out,              // [T, N]
                   const float* in,         // [T, K]
                   const float* weight,     // [N, K]
                   const float* bias,       // [N] or nullptr
                   const float* ln_weight,  // [K] or nullptr
                   const float* ln_bias,    // [K] or nullptr
                   float eps,
                   const float* residual,   // [T, N] or nullptr
                   bool gelu, int num_tokens, int out_features, int in_features, DType dtype,
                   int32_t* greedy_tokens = nullptr,  // [T] or nullptr
                   bool resident = false);

// Warps a row the streaming skinny GEMV picks for an [N, K] weight of dtype on this GPU.
int skinny_warps_per_row(int out_features, int in_features, DType dtype);

// Rows a warp of the resident GEMV for an [N, K] weight of dtype on this GPU (0: none).
int skinny_resident_rows(int out_features, int in_features, DType dtype);

void gelu(float* x, int64_t n, DType dtype);

// k_cache, v_cache are read (cast to dtype), written, and returned (cast back).
void write_kv(float* k_cache,               // [num_blocks, block_size, H, D]
              float* v_cache,               // [num_blocks, block_size, H, D]
              const float* qkv,             // [T, 3 * H * D]
              const int32_t* slot_mapping,  // [T]
              int num_tokens, int num_heads, int head_size, int64_t cache_elems, DType dtype);

enum class AttentionKernel { kAuto, kDecode, kPrefill };

// kAuto: the decode kernel when every sequence has one query token (and the head size has a
// decode template), else prefill. partition_size, heads_per_block 0: as the model picks them.
// slot_mapping given (decode only): the decode kernel also writes each sequence's new K/V (its
// qkv row) to that slot, as in a wide decode step; the caches after it go to k_out, v_out.
// The decode kernel reads each sequence's newest K/V from its qkv row (as the engine's decode
// steps do), the prefill kernel from the cache: the two must hold the same values.
void paged_attention(float* out,                      // [T, H * D]
                     const float* qkv,                // [T, 3 * H * D]
                     const float* k_cache,            // [num_blocks, block_size, H, D]
                     const float* v_cache,            // [num_blocks, block_size, H, D]
                     const int32_t* positions,        // [T]
                     const int32_t* query_start_loc,  // [S + 1]
                     const int32_t* block_tables,     // [S, max_blocks_per_seq]
                     int num_seqs, int max_blocks_per_seq, int num_heads, int head_size,
                     int block_size, int64_t cache_elems, DType dtype, AttentionKernel kernel,
                     int partition_size, int heads_per_block,
                     const int32_t* slot_mapping = nullptr,  // [S] or nullptr
                     float* k_out = nullptr,                 // [cache_elems] (with slot_mapping)
                     float* v_out = nullptr);

// A skinny decode step's attention and proj: the decode kernel leaves every partition's partial
// and the proj GEMV merges them while staging its x (SkinnyInput::kAttentionPartials), then
// residual += attention @ weight^T + bias. One query per sequence (its position positions[s]),
// num_seqs <= 8; partition_size, heads_per_block 0: as the model picks them.
void decode_attention_proj(float* residual,              // [S, H * D], in and out
                           const float* qkv,             // [S, 3 * H * D]
                           const float* k_cache,         // [num_blocks, block_size, H, D]
                           const float* v_cache,         // [num_blocks, block_size, H, D]
                           const int32_t* positions,     // [S]
                           const int32_t* block_tables,  // [S, max_blocks_per_seq]
                           const float* weight,          // [H * D, H * D]
                           const float* bias,            // [H * D]
                           int num_seqs, int max_blocks_per_seq, int num_heads, int head_size,
                           int block_size, int64_t cache_elems, DType dtype, int partition_size,
                           int heads_per_block);

// Heads per decode thread block the model picks for a batch of num_seqs on this GPU (1 or 4).
int decode_heads_per_block(int num_seqs, int num_heads);

// logits are rounded to dtype and, for fp16/bf16, laid out in rows padded to a multiple of 8
// with huge values the sampler must not read, as the LM head leaves them in the model.
void sample(int32_t* next_tokens,   // [R]
            const float* logits,    // [R, V]
            const SamplingInputs& params, int num_rows, int vocab_size, DType dtype);

// cache (one K or V cache, all blocks) is copied in, blocks dst[i] <- src[i], copied back.
void copy_blocks(float* cache,       // [num_blocks, block_size, H, D]
                 int num_blocks, int64_t block_elems,
                 const int32_t* src,  // [n]
                 const int32_t* dst,  // [n]
                 int num_copies, DType dtype);

// ---------------------------------------------------------------------------------------------
// Timing, for tools/bench_kernels.py: device-resident random data, CUDA events, median of iters.
// ---------------------------------------------------------------------------------------------

// Milliseconds per launch of the decode-attention kernel over num_seqs sequences of context_len
// tokens each, with shuffled block tables; partition_size, heads_per_block 0: as the model
// picks them. copies 0: launches replayed from a CUDA graph, each on its own copy of the cache,
// enough copies that none is found in L2 (as in a model step); 1: one cache, each launch timed
// alone (launch included, rows partly in L2).
double time_decode_attention(int num_seqs, int context_len, int num_heads, int head_size,
                             int block_size, DType dtype, int iters, int partition_size = 0,
                             int heads_per_block = 0, int copies = 0);
// Milliseconds per skinny GEMV (float16, bias epilogue) of rows x in_features by
// [out_features, in_features], in a chain of `chain` launched programmatically one after the
// other as a step's are (from a CUDA graph), each on weights not in L2.
// warps_per_row 0: as the launcher picks; prefetch_mb: each GEMV asks L2 for that many MB of
// the next one's weights, as a step's do. l2_resident: every link multiplies the same weights,
// which then stay in L2 where they fit (the GEMV's floor when its weights need no trip to
// memory).
double time_skinny_gemm(int rows, int out_features, int in_features, int chain, int iters,
                        int warps_per_row = 0, int prefetch_mb = 0, bool l2_resident = false);
// Microseconds one all-to-all hand-over between thread blocks costs: barrier false, a kernel
// boundary (a chain of `rounds` tiny kernels launched programmatically, replayed from a CUDA
// graph, each of blocks_per_sm x SMs blocks reading a value another block of the kernel before
// wrote); true, a grid-wide barrier inside one cooperative kernel (a release add and an acquire
// spin on one counter) with the same hand-over. The floor under each dependent step of a
// batch-1 decode. prefetch_mb (kernel boundaries only): each link's blocks also ask L2 for that
// many MB of memory not in it before they wait, as the skinny GEMV does.
double time_dependency(bool barrier, int blocks_per_sm, int threads, int rounds, int iters,
                       int prefetch_mb = 0);
// How a stage of the hand-over timer learns that the vector before it is complete (handover_bench.cu).
enum class Handover { kKernel, kBarrier, kTagged };
// Microseconds one round of a chain costs: every block of blocks_per_sm x SMs gathers a float32
// vector of `width` that all blocks wrote in the round before and writes its slice of the next,
// as a batch-1 GEMV stage does, synchronized as `kind` says: a kernel boundary (programmatic
// launch, graph-replayed), a grid barrier in one cooperative kernel, or words that carry the
// round that wrote them (no barrier: a block re-reads x until every word is this round's).
double time_handover(Handover kind, int width, int blocks_per_sm, int threads, int rounds,
                     int iters);
// The vector after `rounds` rounds of the same chain from x0 [width], y_j = tanh(sum_k c(j, k)
// x_k / sqrt(width) + x_j / 2), c(j, k) = ((31 j + 17 k) mod 13 - 6) / 4: every kind gives it.
std::vector<float> handover_chain(Handover kind, const float* x0, int width, int blocks_per_sm,
                                  int threads, int rounds);
// Microseconds a layer of gpt2's four layer GEMVs at width C (QKV, proj on q, fc with GELU,
// fc_proj; fp16 weights of a fixed pattern, batch 1), `layers` layers of their own weights:
// persistent false, the engine's skinny GEMV kernels (programmatic launches, graph-replayed);
// true, one persistent kernel, one block an SM, tagged words between stages and a producer warp
// streaming each block's rows through a ring in shared memory, ahead across stages
// (handover_bench.cu).
double time_gemv_layers(bool persistent, int C, int layers, int iters);
// The last stage's output [C] of one run of that chain from x0 [C].
std::vector<float> gemv_layers_chain(bool persistent, const float* x0, int C, int layers);
// Device-to-device copy bandwidth in GB/s (bytes read + bytes written), buffers of `bytes`.
double copy_bandwidth_gbs(int64_t bytes, int iters);

}  // namespace pagedgpt2::cuda::ops

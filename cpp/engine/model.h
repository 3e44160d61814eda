// The seam between the engine and a backend (CPU reference or CUDA).
//
// A backend owns the weights and the KV-cache pool. It sees one ragged batch per step, described
// only by flat token arrays, block tables and slot mappings: it never knows the allocator, the
// scheduler or the sequences behind the rows. The Python generation loop builds these arrays.
//
// KV-cache layout, per layer, keys and values separately (defined once, here):
//   k_cache, v_cache : [num_blocks, block_size, n_head, head_size]
// A token at position p of a sequence lives in slot
//   slot = block_table[p / block_size] * block_size + p % block_size.
// The contiguous ("standard caching") mode is the same layout with block_size = n_positions and one
// block per sequence.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/config.h"

namespace pagedgpt2 {

// One forward over a ragged batch of sequences: prefill chunks and decode tokens mixed.
// All arrays are host memory, int32.
struct StepInputs {
  int num_tokens = 0;          // T: new tokens in the batch, all sequences together
  int num_seqs = 0;            // S
  int max_blocks_per_seq = 0;  // B: width of block_tables
  int num_logits = 0;          // R: rows whose logits are wanted

  const int32_t* token_ids = nullptr;        // [T]
  const int32_t* positions = nullptr;        // [T]   position of each token in its sequence
  const int32_t* slot_mapping = nullptr;     // [T]   cache slot each token's K/V is written to
  const int32_t* query_start_loc = nullptr;  // [S+1] tokens of seq s are rows [qsl[s], qsl[s+1])
  const int32_t* context_lens = nullptr;     // [S]   tokens in the cache after this step
  const int32_t* block_tables = nullptr;     // [S, B]
  const int32_t* logits_indices = nullptr;   // [R]   rows of the batch whose logits are wanted
};

// Per-row sampling parameters for the rows named by StepInputs::logits_indices.
struct SamplingInputs {
  const float* temperature = nullptr;  // [R] 0 = greedy
  const int32_t* top_k = nullptr;      // [R] 0 = off
  const float* top_p = nullptr;        // [R] 1 = off
  const uint64_t* seeds = nullptr;     // [R] per-request seed
  const int64_t* counters = nullptr;   // [R] draw index within the request (reproducible streams)
};

// A named host tensor handed over by the Python loader (float32, row-major). The backend copies
// what it needs during construction; the data need not outlive the constructor.
struct HostTensor {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};
using HostWeights = std::map<std::string, HostTensor>;

class Model {
 public:
  virtual ~Model() = default;

  // logits: [R, vocab_size] float32, host.
  virtual void forward(const StepInputs& in, float* logits) = 0;
  // Forward, then one token per logits row. next_tokens: [R] int32, host.
  virtual void forward_and_sample(const StepInputs& in, const SamplingInputs& sampling,
                                  int32_t* next_tokens) = 0;
  // num_steps decode steps in one call. Step 0 is `in`, a decode batch (one token per sequence,
  // num_tokens == num_seqs == num_logits, row s = sequence s); step i > 0 feeds the tokens step
  // i - 1 sampled, at positions + i with context_lens + i and sampling counters + i, and writes
  // its keys/values to slot_mappings[i]. block_tables must hold the blocks of every step.
  // slot_mappings: [num_steps, S] (row 0 = in.slot_mapping); next_tokens: [num_steps, S].
  // No launched run may be uncollected.
  void decode_steps(const StepInputs& in, const SamplingInputs& sampling, int num_steps,
                    const int32_t* slot_mappings, int32_t* next_tokens);

  // Decode runs launched ahead: the host prepares run i + 1, and reads run i's tokens, while the
  // backend computes (the CUDA backend returns at once; the CPU backend computes at launch).
  // launch_decode_steps starts a run as decode_steps describes; with continue_run, step 0 feeds
  // the tokens the last step of the previous launched run sampled, which the host need not have
  // seen (in.token_ids is not read). At most one run may be uncollected when a run is launched.
  // collect_decode_steps waits for the oldest uncollected run: next_tokens [num_steps, S].
  void launch_decode_steps(const StepInputs& in, const SamplingInputs& sampling, int num_steps,
                           const int32_t* slot_mappings, bool continue_run);
  void collect_decode_steps(int32_t* next_tokens);
  int runs_in_flight() const { return int(runs_.size()); }
  // (num_steps, num_seqs) of the run collect_decode_steps returns next.
  std::pair<int, int> oldest_run_shape() const;

  // Copies whole blocks of every layer's K and V cache: dst[i] <- src[i] (copy-on-write).
  virtual void copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) = 0;

  virtual const ModelConfig& config() const = 0;
  virtual int num_blocks() const = 0;
  virtual int block_size() const = 0;
  virtual int64_t kv_bytes_per_block() const = 0;
  virtual std::string device_name() const = 0;

 protected:
  // A backend that computes decode runs without blocking the host enqueues one here and returns
  // true (false: run it now, one step at a time); continue_run as in launch_decode_steps.
  virtual bool enqueue_decode_run(const StepInputs& in, const SamplingInputs& sampling,
                                  int num_steps, const int32_t* slot_mappings,
                                  bool continue_run);
  // Waits for the oldest run enqueue_decode_run accepted: next_tokens [num_steps, S].
  virtual void wait_decode_run(int32_t* next_tokens);

 private:
  struct DecodeRun {
    int num_steps = 0, num_seqs = 0;
    bool enqueued = false;        // computing on the backend; else done, tokens below
    std::vector<int32_t> tokens;  // [num_steps, num_seqs]
  };
  void run_steps_now(const StepInputs& in, const SamplingInputs& sampling, int num_steps,
                     const int32_t* slot_mappings, int32_t* next_tokens);
  std::deque<DecodeRun> runs_;  // launched, not collected, oldest first
  std::vector<int32_t> last_tokens_;  // [S] last row of the newest run, once collected
};

}  // namespace pagedgpt2

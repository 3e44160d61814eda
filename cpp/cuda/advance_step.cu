// advance_decode_step: one thread block (see advance_step.cuh).
#include "cuda/advance_step.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/sampling.cuh"  // key_id

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 256;

// One block, so that every thread reads *run_step before thread 0 moves it on.
__global__ void advance_decode_step_kernel(int32_t* token_ids, int32_t* positions,
                                           int32_t* slot_mapping, int32_t* context_lens,
                                           int64_t* counters, int32_t* history,
                                           int32_t* next_tokens, unsigned long long* greedy_keys,
                                           const int32_t* next_slots, int32_t* run_step,
                                           int num_rows) {
  pdl_wait();  // next_tokens or greedy_keys, and every input the step's kernels read
  const int64_t row0 = int64_t(*run_step) * num_rows;
  for (int s = threadIdx.x; s < num_rows; s += kThreads) {
    int32_t token;
    if (greedy_keys) {  // the LM head's argmax; zeroed for the next step's, padding rows too
      token = key_id(greedy_keys[s]);
      greedy_keys[s] = 0;
      next_tokens[s] = token;
    }
    if (context_lens[s] <= 0) continue;  // padding
    if (!greedy_keys) token = next_tokens[s];
    history[row0 + s] = token;
    token_ids[s] = token;
    positions[s] += 1;
    context_lens[s] += 1;
    if (counters) counters[s] += 1;
    slot_mapping[s] = next_slots[row0 + s];
  }
  __syncthreads();
  if (threadIdx.x == 0) *run_step += 1;
}

}  // namespace

void launch_advance_decode_step(int32_t* token_ids, int32_t* positions, int32_t* slot_mapping,
                                int32_t* context_lens, int64_t* counters, int32_t* history,
                                int32_t* next_tokens, unsigned long long* greedy_keys,
                                const int32_t* next_slots, int32_t* run_step, int num_rows,
                                cudaStream_t stream, bool pdl) {
  if (num_rows <= 0) return;
  launch_kernel(advance_decode_step_kernel, dim3(1), dim3(kThreads), 0, stream, pdl, token_ids,
                positions, slot_mapping, context_lens, counters, history, next_tokens,
                greedy_keys, next_slots, run_step, num_rows);
}

}  // namespace pagedgpt2::cuda

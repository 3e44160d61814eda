// advance_decode_step: one thread per sequence (see advance_step.cuh).
#include "cuda/advance_step.cuh"
#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {
namespace {

__global__ void advance_decode_step_kernel(int32_t* token_ids, int32_t* positions,
                                           int32_t* slot_mapping, int32_t* context_lens,
                                           int64_t* counters, int32_t* history,
                                           const int32_t* next_tokens, const int32_t* next_slots,
                                           int num_seqs) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= num_seqs) return;
  const int32_t token = next_tokens[s];
  history[s] = token;
  token_ids[s] = token;
  positions[s] += 1;
  context_lens[s] += 1;
  if (counters) counters[s] += 1;
  slot_mapping[s] = next_slots[s];
}

}  // namespace

void launch_advance_decode_step(int32_t* token_ids, int32_t* positions, int32_t* slot_mapping,
                                int32_t* context_lens, int64_t* counters, int32_t* history,
                                const int32_t* next_tokens, const int32_t* next_slots,
                                int num_seqs, cudaStream_t stream) {
  if (num_seqs <= 0) return;
  constexpr int kThreads = 256;
  advance_decode_step_kernel<<<(num_seqs + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      token_ids, positions, slot_mapping, context_lens, counters, history, next_tokens,
      next_slots, num_seqs);
  CUDA_CHECK_LAUNCH();
}

}  // namespace pagedgpt2::cuda

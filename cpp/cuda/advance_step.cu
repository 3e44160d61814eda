// advance_decode_step: one thread block (see advance_step.cuh).
#include "cuda/advance_step.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/sampling.cuh"  // key_id

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kEmbedBatch = 4;  // elements a thread loads before it stores any

// residual[s] = wte[token_ids[s]] + wpe[positions[s]] for the num_rows rows (all threads; the
// tokens and positions are this block's writes, so the caller syncs first).
template <typename T>
__device__ void embed_rows(const NextEmbedding<T>& next, const int32_t* token_ids,
                           const int32_t* positions, int num_rows) {
  const int C = next.C;
  for (int s = 0; s < num_rows; ++s) {
    const T* te = next.wte + int64_t(token_ids[s]) * C;
    const T* pe = next.wpe + int64_t(positions[s]) * C;
    float* x = next.residual + int64_t(s) * C;
    for (int c0 = threadIdx.x; c0 < C; c0 += kEmbedBatch * kThreads) {
      float v[kEmbedBatch];
#pragma unroll
      for (int j = 0; j < kEmbedBatch; ++j) {
        const int c = c0 + j * kThreads;
        v[j] = c < C ? to_float(__ldg(te + c)) + to_float(__ldg(pe + c)) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kEmbedBatch; ++j) {
        if (c0 + j * kThreads < C) x[c0 + j * kThreads] = v[j];
      }
    }
  }
}

// One block, so that every thread reads *run_step before thread 0 moves it on.
template <typename T>
__global__ void advance_decode_step_kernel(int32_t* token_ids, int32_t* positions,
                                           int32_t* slot_mapping, int32_t* context_lens,
                                           int64_t* counters, int32_t* history,
                                           int32_t* next_tokens, unsigned long long* greedy_keys,
                                           const int32_t* next_slots, int32_t* run_step,
                                           int num_rows, const NextEmbedding<T> next) {
  pdl_wait();  // next_tokens or greedy_keys, and every input the step's kernels read
  const int64_t row0 = int64_t(*run_step) * num_rows;
  for (int s = threadIdx.x; s < num_rows; s += kThreads) {
    // The LM head's argmax (its keys zeroed for the next step's, padding rows' too), else the
    // sampler's token.
    int32_t token;
    if (greedy_keys) {
      token = key_id(greedy_keys[s]);
      greedy_keys[s] = 0;
      next_tokens[s] = token;
    } else {
      token = next_tokens[s];
    }
    if (context_lens[s] <= 0) continue;  // padding
    history[row0 + s] = token;
    token_ids[s] = token;
    positions[s] += 1;
    context_lens[s] += 1;
    if (counters) counters[s] += 1;
    slot_mapping[s] = next_slots[row0 + s];
  }
  __syncthreads();
  if (threadIdx.x == 0) *run_step += 1;
  if (next.residual) embed_rows(next, token_ids, positions, num_rows);
}

}  // namespace

template <typename T>
void launch_advance_decode_step(int32_t* token_ids, int32_t* positions, int32_t* slot_mapping,
                                int32_t* context_lens, int64_t* counters, int32_t* history,
                                int32_t* next_tokens, unsigned long long* greedy_keys,
                                const int32_t* next_slots, int32_t* run_step, int num_rows,
                                const NextEmbedding<T>& next, cudaStream_t stream, bool pdl) {
  if (num_rows <= 0) return;
  launch_kernel(advance_decode_step_kernel<T>, dim3(1), dim3(kThreads), 0, stream, pdl,
                token_ids, positions, slot_mapping, context_lens, counters, history, next_tokens,
                greedy_keys, next_slots, run_step, num_rows, next);
}

#define INSTANTIATE(T)                                                                          \
  template void launch_advance_decode_step<T>(int32_t*, int32_t*, int32_t*, int32_t*, int64_t*, \
                                              int32_t*, int32_t*, unsigned long long*,          \
                                              const int32_t*, int32_t*, int,                    \
                                              const NextEmbedding<T>&, cudaStream_t, bool);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace pagedgpt2::cuda

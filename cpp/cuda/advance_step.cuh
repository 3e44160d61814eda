// Turns the inputs of one decode step, already on the device, into the next step's, without the
// host: the sampled tokens become the new inputs, and every sequence moves one position on.
// Captured at the end of a decode step's graph for the steps of a multi-step decode call that
// have a step after them (Model::decode_steps): its arguments are the same at every step, so the
// step it is at comes from a counter on the device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// The next step's x, for decode graphs that leave their embedding out (skinny steps: the
// embedding kernel and its hand-over cost more than these loads in the advance): after
// advancing, residual[s] = wte[token_ids[s]] + wpe[positions[s]] for every row s, padding rows
// too, as launch_embedding would compute it at the start of the next step.
template <typename T>
struct NextEmbedding {
  float* residual = nullptr;  // [num_rows, C]; nullptr: nothing embedded
  const T* wte = nullptr;     // [V, C]
  const T* wpe = nullptr;     // [P, C]
  int C = 0;
};

// With i = *run_step (steps advanced so far in this run), for each row s < num_rows whose
// context_lens[s] > 0 (a bucket's padding rows have 0 and stay as they are):
//   history[i, s] = token_ids[s] = next_tokens[s]; slot_mapping[s] = next_slots[i, s];
//   positions[s], context_lens[s] and counters[s] (if not null) grow by one;
// then *run_step = i + 1, and the next step's x is embedded if `next` asks for it.
template <typename T>
void launch_advance_decode_step(int32_t* token_ids,           // [num_rows]
                                int32_t* positions,           // [num_rows]
                                int32_t* slot_mapping,        // [num_rows]
                                int32_t* context_lens,        // [num_rows]
                                int64_t* counters,            // [num_rows] or nullptr
                                int32_t* history,             // [steps, num_rows] sampled ids
                                int32_t* next_tokens,         // [num_rows] sampled by this step
                                // [num_rows] or nullptr: this step's greedy keys (the LM
                                // head's SkinnyParams::argmax); if given, next_tokens[s] =
                                // key_id(greedy_keys[s]) first, and every key is reset to 0
                                unsigned long long* greedy_keys,
                                const int32_t* next_slots,    // [steps, num_rows] cache slots
                                int32_t* run_step,            // [1]
                                int num_rows, const NextEmbedding<T>& next,
                                cudaStream_t stream,
                                bool pdl = false);  // programmatic launch (sm_90), after the
                                                    // sampler or the LM head: the kernel
                                                    // waits for it first

}  // namespace pagedgpt2::cuda

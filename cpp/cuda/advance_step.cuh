// Turns the inputs of one decode step, already on the device, into the next step's, without the
// host: the sampled tokens become the new inputs, and every sequence moves one position on.
// Used between the graph replays of a multi-step decode call (Model::decode_steps).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedgpt2::cuda {

// For s < num_seqs: history[s] = token_ids[s] = next_tokens[s]; positions[s], context_lens[s]
// and counters[s] (if not null) grow by one; slot_mapping[s] = next_slots[s].
void launch_advance_decode_step(int32_t* token_ids,           // [S]
                                int32_t* positions,           // [S]
                                int32_t* slot_mapping,        // [S]
                                int32_t* context_lens,        // [S]
                                int64_t* counters,            // [S] or nullptr
                                int32_t* history,             // [S] this step's sampled ids
                                const int32_t* next_tokens,   // [S] sampled by the last step
                                const int32_t* next_slots,    // [S] cache slots of the next step
                                int num_seqs, cudaStream_t stream);

}  // namespace pagedgpt2::cuda

// The GPT-2 hyperparameters the C++ core needs. Filled from the converted model's config.json
// by the Python side and checked there; the core trusts them.
#pragma once

#include <cstdint>

namespace pagedgpt2 {

struct ModelConfig {
  int vocab_size = 50257;
  int n_positions = 1024;  // context length: the most tokens one sequence may hold
  int n_embd = 768;        // C
  int n_layer = 12;        // L
  int n_head = 12;         // H
  int n_inner = 3072;      // I, the MLP width (4 * C for every released GPT-2)
  float layer_norm_epsilon = 1e-5f;

  int head_size() const { return n_embd / n_head; }  // D
  // Floats of K plus V that one token holds in one layer.
  int64_t kv_floats_per_token_layer() const { return 2LL * n_embd; }
};

}  // namespace pagedgpt2

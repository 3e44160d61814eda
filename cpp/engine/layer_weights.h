// One GPT-2 layer's tensors as both backends point at them, and the one list of their names and
// shapes in a converted checkpoint.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedgpt2 {

// LayerNorm parameters stay float32; the matrices and biases are in the backend's dtype W.
template <typename W>
struct LayerWeights {
  const float* ln_1_w;  // [C]
  const float* ln_1_b;  // [C]
  const W* qkv_w;       // [3C, C]
  const W* qkv_b;       // [3C]
  const W* proj_w;      // [C, C]
  const W* proj_b;      // [C]
  const float* ln_2_w;  // [C]
  const float* ln_2_b;  // [C]
  const W* fc_w;        // [I, C]
  const W* fc_b;        // [I]
  const W* fc_proj_w;   // [C, I]
  const W* fc_proj_b;   // [C]
};

// Calls visit(name, shape, dst) for each tensor of layer l, in the order a step reads them: name
// as in the checkpoint ("h.{l}.ln_1.weight", ...), dst the member to point at it (const float**
// for the LayerNorm parameters, const W** for the rest).
template <typename W, typename Visit>
void for_each_layer_tensor(LayerWeights<W>& w, int l, int64_t C, int64_t I, Visit visit) {
  const std::string p = "h." + std::to_string(l) + ".";
  visit(p + "ln_1.weight", std::vector<int64_t>{C}, &w.ln_1_w);
  visit(p + "ln_1.bias", std::vector<int64_t>{C}, &w.ln_1_b);
  visit(p + "attn.qkv.weight", std::vector<int64_t>{3 * C, C}, &w.qkv_w);
  visit(p + "attn.qkv.bias", std::vector<int64_t>{3 * C}, &w.qkv_b);
  visit(p + "attn.proj.weight", std::vector<int64_t>{C, C}, &w.proj_w);
  visit(p + "attn.proj.bias", std::vector<int64_t>{C}, &w.proj_b);
  visit(p + "ln_2.weight", std::vector<int64_t>{C}, &w.ln_2_w);
  visit(p + "ln_2.bias", std::vector<int64_t>{C}, &w.ln_2_b);
  visit(p + "mlp.fc.weight", std::vector<int64_t>{I, C}, &w.fc_w);
  visit(p + "mlp.fc.bias", std::vector<int64_t>{I}, &w.fc_b);
  visit(p + "mlp.proj.weight", std::vector<int64_t>{C, I}, &w.fc_proj_w);
  visit(p + "mlp.proj.bias", std::vector<int64_t>{C}, &w.fc_proj_b);
}

}  // namespace pagedgpt2

// The CPU backend: GPT-2 forward over a ragged batch with a paged KV cache in host memory,
// float32 throughout. Also the reference the CUDA backend is compared against end to end.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/layer_weights.h"
#include "engine/model.h"

namespace pagedgpt2::cpu {

class CpuModel : public Model {
 public:
  CpuModel(const ModelConfig& config, const HostWeights& weights, int num_blocks, int block_size,
           int num_threads);

  void forward(const StepInputs& in, float* logits) override;
  void forward_and_sample(const StepInputs& in, const SamplingInputs& sampling,
                          int32_t* next_tokens) override;
  void copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) override;

  const ModelConfig& config() const override { return cfg_; }
  int num_blocks() const override { return num_blocks_; }
  int block_size() const override { return block_size_; }
  int64_t kv_bytes_per_block() const override;
  std::string device_name() const override { return "cpu"; }

 private:
  struct Layer : LayerWeights<float> {
    float* k_cache;  // [num_blocks, block_size, H, D]
    float* v_cache;  // [num_blocks, block_size, H, D]
  };

  const float* take(const HostWeights& weights, const std::string& name,
                    std::vector<int64_t> shape);
  void run_layers(const StepInputs& in);
  void final_logits(const StepInputs& in, float* logits);

  ModelConfig cfg_;
  int num_blocks_;
  int block_size_;
  int num_threads_;
  std::vector<std::unique_ptr<float[]>> params_;  // owned copies of the weights
  const float* wte_ = nullptr;   // [V, C] (also the LM head)
  const float* wpe_ = nullptr;   // [P, C]
  const float* ln_f_w_ = nullptr;  // [C]
  const float* ln_f_b_ = nullptr;  // [C]
  std::vector<Layer> layers_;
  std::unique_ptr<float[]> kv_pool_;  // [L, 2, num_blocks, block_size, H, D], one allocation

  // Activations, grown to the largest batch seen.
  std::vector<float> x_;     // [T, C] residual stream
  std::vector<float> ln_;    // [T, C]
  std::vector<float> qkv_;   // [T, 3C]
  std::vector<float> att_;   // [T, C]
  std::vector<float> tmp_;   // [T, C]
  std::vector<float> mlp_;   // [T, I]
  std::vector<float> rows_;  // [R, C] final hidden rows whose logits are wanted
  std::vector<float> logits_;  // [R, V] for forward_and_sample
};

}  // namespace pagedgpt2::cpu

// The CUDA backend: GPT-2 forward over a ragged batch with a paged KV cache on one GPU, in
// float32, float16 or bfloat16, with sampling on the GPU and decode steps replayed from CUDA
// graphs. Plain C++ (a pimpl over the templated engine in cuda_model.cu) so the nanobind module,
// built by the host compiler, can include it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/model.h"

namespace pagedgpt2::cuda {

class CudaModel : public Model {
 public:
  // weights: float32 host tensors named as in python/pagedgpt2/weights.py (wte, wpe,
  //   h.{l}.ln_1.weight, h.{l}.attn.qkv.weight [3C, C], ..., ln_f.bias); uploaded once in dtype.
  // dtype: "float32" | "float16" | "bfloat16".
  // num_blocks: KV blocks in the pool; -1 sizes the pool from free GPU memory (after weights and
  //   activations) times gpu_memory_fraction. The pool is one allocation, made here.
  // max_num_seqs: the largest decode batch: sizes buffers and the largest CUDA-graph bucket.
  // max_num_batched_tokens: the largest number of tokens in one step: sizes the activations.
  CudaModel(const ModelConfig& config, const HostWeights& weights, const std::string& dtype,
            int num_blocks, int block_size, double gpu_memory_fraction = 0.9,
            int device_index = 0, int max_num_seqs = 256, int max_num_batched_tokens = 2048);
  ~CudaModel() override;

  void forward(const StepInputs& in, float* logits) override;
  void forward_and_sample(const StepInputs& in, const SamplingInputs& sampling,
                          int32_t* next_tokens) override;
  void copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) override;

  const ModelConfig& config() const override;
  int num_blocks() const override;
  int block_size() const override;
  int64_t kv_bytes_per_block() const override;
  std::string device_name() const override;

  std::string dtype() const;
  // Decode steps (every sequence has one new token) replay CUDA graphs when on (the default).
  bool use_cuda_graphs() const;
  void set_use_cuda_graphs(bool on);
  int num_cuda_graphs() const;  // captured so far

  struct Impl;

 protected:
  // A decode run replays the decode graph num_steps times, the sampled tokens fed back on the
  // GPU, and downloads all of them at the end; the host waits only in wait_decode_run.
  bool enqueue_decode_run(const StepInputs& in, const SamplingInputs& sampling, int num_steps,
                          const int32_t* slot_mappings, bool continue_run) override;
  void wait_decode_run(int32_t* next_tokens) override;

 private:
  std::unique_ptr<Impl> impl_;
};

// Number of visible CUDA devices (0 when there is no driver or GPU).
int device_count();

}  // namespace pagedgpt2::cuda

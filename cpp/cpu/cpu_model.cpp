#include "cpu/cpu_model.h"

#include <omp.h>

#include <cstring>
#include <new>
#include <stdexcept>

#include "cpu/ops.h"

namespace pagedgpt2::cpu {
namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Runs f with the backend's thread count, restoring the caller's afterwards.
template <class F>
void with_threads(int num_threads, F&& f) {
  const int saved = omp_get_max_threads();
  if (num_threads > 0) omp_set_num_threads(num_threads);
  f();
  omp_set_num_threads(saved);
}

}  // namespace

CpuModel::CpuModel(const ModelConfig& config, const HostWeights& weights, int num_blocks,
                   int block_size, int num_threads)
    : cfg_(config), num_blocks_(num_blocks), block_size_(block_size), num_threads_(num_threads) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks must be >= 1");
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1");
  const int64_t C = cfg_.n_embd, I = cfg_.n_inner;
  wte_ = take(weights, "wte", {cfg_.vocab_size, C});
  wpe_ = take(weights, "wpe", {cfg_.n_positions, C});
  ln_f_w_ = take(weights, "ln_f.weight", {C});
  ln_f_b_ = take(weights, "ln_f.bias", {C});

  const int64_t layer_floats = int64_t(num_blocks) * block_size * C;
  try {
    kv_pool_.reset(new float[size_t(2 * cfg_.n_layer * layer_floats)]);  // not touched: lazy
  } catch (const std::bad_alloc&) {
    throw std::runtime_error("cannot allocate the KV cache: " + std::to_string(num_blocks) +
                             " blocks of " + std::to_string(kv_bytes_per_block()) + " bytes");
  }
  for (int l = 0; l < cfg_.n_layer; ++l) {
    Layer layer;
    for_each_layer_tensor(layer, l, C, I, [&](const std::string& name, std::vector<int64_t> shape,
                                              const float** dst) {
      *dst = take(weights, name, shape);
    });
    layer.k_cache = kv_pool_.get() + (2 * l) * layer_floats;
    layer.v_cache = kv_pool_.get() + (2 * l + 1) * layer_floats;
    layers_.push_back(layer);
  }
}

const float* CpuModel::take(const HostWeights& weights, const std::string& name,
                            std::vector<int64_t> shape) {
  auto it = weights.find(name);
  if (it == weights.end()) throw std::invalid_argument("missing weight tensor '" + name + "'");
  if (it->second.shape != shape) {
    throw std::invalid_argument("weight tensor '" + name + "' has shape " +
                                shape_str(it->second.shape) + ", the config needs " +
                                shape_str(shape));
  }
  size_t n = 1;
  for (int64_t d : shape) n *= size_t(d);
  params_.emplace_back(new float[n]);
  std::memcpy(params_.back().get(), it->second.data, n * sizeof(float));
  return params_.back().get();
}

int64_t CpuModel::kv_bytes_per_block() const {
  return int64_t(block_size_) * cfg_.kv_floats_per_token_layer() * cfg_.n_layer * sizeof(float);
}

void CpuModel::run_layers(const StepInputs& in) {
  const int T = in.num_tokens, C = cfg_.n_embd, I = cfg_.n_inner;
  x_.resize(size_t(T) * C);
  ln_.resize(size_t(T) * C);
  qkv_.resize(size_t(T) * 3 * C);
  att_.resize(size_t(T) * C);
  tmp_.resize(size_t(T) * C);
  mlp_.resize(size_t(T) * I);

  for (int t = 0; t < T; ++t) {  // token + position embedding
    const float* te = wte_ + size_t(in.token_ids[t]) * C;
    const float* pe = wpe_ + size_t(in.positions[t]) * C;
    for (int c = 0; c < C; ++c) x_[size_t(t) * C + c] = te[c] + pe[c];
  }
  for (const Layer& L : layers_) {
    layernorm(ln_.data(), x_.data(), L.ln_1_w, L.ln_1_b, T, C, cfg_.layer_norm_epsilon);
    matmul(qkv_.data(), ln_.data(), L.qkv_w, L.qkv_b, T, 3 * C, C);
    write_kv(L.k_cache, L.v_cache, qkv_.data(), in.slot_mapping, T, cfg_.n_head, cfg_.head_size());
    paged_attention(att_.data(), qkv_.data(), L.k_cache, L.v_cache, in.positions,
                    in.query_start_loc, in.block_tables, in.num_seqs, in.max_blocks_per_seq,
                    cfg_.n_head, cfg_.head_size(), block_size_);
    matmul(tmp_.data(), att_.data(), L.proj_w, L.proj_b, T, C, C);
    residual_add(x_.data(), tmp_.data(), int64_t(T) * C);
    layernorm(ln_.data(), x_.data(), L.ln_2_w, L.ln_2_b, T, C, cfg_.layer_norm_epsilon);
    matmul(mlp_.data(), ln_.data(), L.fc_w, L.fc_b, T, I, C);
    gelu(mlp_.data(), int64_t(T) * I);
    matmul(tmp_.data(), mlp_.data(), L.fc_proj_w, L.fc_proj_b, T, C, I);
    residual_add(x_.data(), tmp_.data(), int64_t(T) * C);
  }
}

void CpuModel::final_logits(const StepInputs& in, float* logits) {
  const int R = in.num_logits, C = cfg_.n_embd;
  rows_.resize(size_t(R) * C);
  for (int r = 0; r < R; ++r) {
    const float* src = x_.data() + size_t(in.logits_indices[r]) * C;
    layernorm(rows_.data() + size_t(r) * C, src, ln_f_w_, ln_f_b_, 1, C, cfg_.layer_norm_epsilon);
  }
  matmul(logits, rows_.data(), wte_, nullptr, R, cfg_.vocab_size, C);  // tied LM head
}

void CpuModel::forward(const StepInputs& in, float* logits) {
  with_threads(num_threads_, [&] {
    run_layers(in);
    final_logits(in, logits);
  });
}

void CpuModel::forward_and_sample(const StepInputs& in, const SamplingInputs& sampling,
                                  int32_t* next_tokens) {
  with_threads(num_threads_, [&] {
    logits_.resize(size_t(in.num_logits) * cfg_.vocab_size);
    run_layers(in);
    final_logits(in, logits_.data());
    sample(next_tokens, logits_.data(), sampling, in.num_logits, cfg_.vocab_size);
  });
}

void CpuModel::copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) {
  const size_t block_floats = size_t(block_size_) * cfg_.n_embd;
  for (const Layer& L : layers_) {
    for (float* cache : {L.k_cache, L.v_cache}) {
      for (int i = 0; i < num_copies; ++i) {
        std::memcpy(cache + dst[i] * block_floats, cache + src[i] * block_floats,
                    block_floats * sizeof(float));
      }
    }
  }
}

}  // namespace pagedgpt2::cpu

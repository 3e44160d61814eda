// The test ops (see ops.h): float32 host arrays -> device arrays in T -> one kernel launcher ->
// float32 host arrays. Synchronous, on the legacy default stream; allocation per call is fine
// here (tests only), unlike in the model.
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cuda/activation.cuh"
#include "cuda/advance_step.cuh"
#include "cuda/attention_decode.cuh"
#include "cuda/attention_prefill.cuh"
#include "cuda/copy_blocks.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/embedding.cuh"
#include "cuda/gemm.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/ops.h"
#include "cuda/ops_device.cuh"
#include "cuda/sampling.cuh"
#include "cuda/sampling_host.h"
#include "cuda/skinny_gemm.cuh"
#include "cuda/write_kv.cuh"

namespace pagedgpt2::cuda::ops {
namespace {

template <typename To, typename From>
__global__ void cast_kernel(To* dst, const From* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = from_float<To>(to_float(src[i]));
  }
}

template <typename To, typename From>
void cast(To* dst, const From* src, size_t n) {
  if (n == 0) return;
  const int blocks = int(std::min<size_t>((n + 255) / 256, 4096));
  cast_kernel<To, From><<<blocks, 256, 0, kStream>>>(dst, src, int64_t(n));
  CUDA_CHECK_LAUNCH();
}

// Host float32 -> device T.
template <typename T>
std::unique_ptr<DevArray<T>> upload(const float* host, size_t n) {
  auto out = std::make_unique<DevArray<T>>(n);
  if (!host || n == 0) return out;
  DevArray<float> staging(n);
  CUDA_CHECK(cudaMemcpy(staging.get(), host, n * sizeof(float), cudaMemcpyHostToDevice));
  cast<T, float>(out->get(), staging.get(), n);
  return out;
}

template <typename T>
std::unique_ptr<DevArray<T>> upload_raw(const T* host, size_t n) {
  auto out = std::make_unique<DevArray<T>>(n);
  if (n) CUDA_CHECK(cudaMemcpy(out->get(), host, n * sizeof(T), cudaMemcpyHostToDevice));
  return out;
}

// Device T -> host float32.
template <typename T>
void download(float* host, const T* dev, size_t n) {
  if (n == 0) return;
  DevArray<float> staging(n);
  cast<float, T>(staging.get(), dev, n);
  CUDA_CHECK(cudaMemcpy(host, staging.get(), n * sizeof(float), cudaMemcpyDeviceToHost));
}

// Fills a fresh output with NaN (0xff bytes) so an element a kernel forgets to write shows up.
template <typename T>
void poison(DevArray<T>& a) {
  CUDA_CHECK(cudaMemset(a.get(), 0xff, std::max<size_t>(a.size(), 1) * sizeof(T)));
}

// The split workspace of one decode-attention launch over num_parts partitions, counters zeroed.
struct DecodeScratch {
  DecodeScratch(int num_seqs, int num_heads, int head_size, int num_parts)
      : rows(int64_t(num_seqs) * num_heads * num_parts),
        partial_out(size_t(rows) * head_size),
        partial_max(size_t(rows)),
        partial_sum(size_t(rows)),
        counters(size_t(num_seqs) * num_heads) {
    CUDA_CHECK(cudaMemset(counters.get(), 0, counters.size() * sizeof(unsigned)));
    ws = DecodeWorkspace{partial_out.get(), partial_max.get(), partial_sum.get(), counters.get(),
                         rows, int64_t(counters.size())};
  }
  int64_t rows;
  DevArray<float> partial_out, partial_max, partial_sum;
  DevArray<unsigned> counters;
  DecodeWorkspace ws;
};

// A decode launch's work split: what the caller asked for, the model's pick where it passed 0.
struct DecodeSplit {
  int partition_size, heads_per_block;
};
DecodeSplit decode_split(int num_seqs, int num_heads, int max_context_len, int partition_size,
                         int heads_per_block) {
  DecodeSplit split;
  split.heads_per_block =
      heads_per_block > 0 ? heads_per_block
                          : cuda::decode_heads_per_block(num_seqs, num_heads, num_sms());
  split.partition_size = partition_size > 0 ? partition_size
                                            : decode_partition_size(num_seqs, num_heads,
                                                                    max_context_len, num_sms(),
                                                                    split.heads_per_block);
  return split;
}

// A decode-attention launch planned from the sequences' context lengths, as a step plans it:
// the split (decode_split), the partitions it makes and the workspace of their partials.
struct DecodePlan {
  DecodePlan(const std::vector<int32_t>& context_lens, int num_heads, int head_size,
             int partition_size, int heads_per_block)
      : max_ctx(std::max(1, *std::max_element(context_lens.begin(), context_lens.end()))),
        split(decode_split(int(context_lens.size()), num_heads, max_ctx, partition_size,
                           heads_per_block)),
        num_parts(decode_num_partitions(max_ctx, split.partition_size)),
        scratch(int(context_lens.size()), num_heads, head_size, num_parts) {}
  int max_ctx;
  DecodeSplit split;
  int num_parts;
  DecodeScratch scratch;
};

}  // namespace

void layernorm(float* out, const float* in, const float* weight, const float* bias,
               int num_tokens, int channels, float eps, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t n = size_t(num_tokens) * channels;
    // The model's residual stream is float32: round the input to T first, as tests expect T in.
    auto x_t = upload<T>(in, n);
    DevArray<float> x(n);
    cast<float, T>(x.get(), x_t->get(), n);
    auto w = upload<float>(weight, channels), b = upload<float>(bias, channels);
    DevArray<T> y(n);
    poison(y);
    launch_add_layernorm<T>(x.get(), nullptr, y.get(), w->get(), b->get(), nullptr, num_tokens,
                            channels, eps, kStream);
    download(out, y.get(), n);
  });
}

void add_layernorm(float* residual, const float* delta, float* out, const float* weight,
                   const float* bias, const int32_t* rows, int num_tokens, int num_rows,
                   int channels, float eps, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t n = size_t(num_tokens) * channels, n_out = size_t(num_rows) * channels;
    auto x = upload<float>(residual, n);
    auto d = upload<T>(delta, delta ? n : 0);
    auto w = upload<float>(weight, out ? channels : 0), b = upload<float>(bias, out ? channels : 0);
    auto r = upload_raw<int32_t>(rows, rows ? num_rows : 0);
    DevArray<T> y(out ? n_out : 0);
    poison(y);
    launch_add_layernorm<T>(x->get(), delta ? d->get() : nullptr, out ? y.get() : nullptr,
                            w->get(), b->get(), rows ? r->get() : nullptr, num_rows, channels, eps,
                            kStream);
    CUDA_CHECK(cudaMemcpy(residual, x->get(), n * sizeof(float), cudaMemcpyDeviceToHost));
    if (out) download(out, y.get(), n_out);
  });
}

void embedding(float* residual, float* ln_out, const int32_t* token_ids, const int32_t* positions,
               const float* wte, const float* wpe, const float* ln_weight, const float* ln_bias,
               int num_tokens, int vocab_size, int num_positions, int channels, float eps,
               DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t n = size_t(num_tokens) * channels;
    auto te = upload<T>(wte, size_t(vocab_size) * channels);
    auto pe = upload<T>(wpe, size_t(num_positions) * channels);
    auto ids = upload_raw<int32_t>(token_ids, num_tokens);
    auto pos = upload_raw<int32_t>(positions, num_tokens);
    auto lw = upload<float>(ln_weight, ln_out ? channels : 0);
    auto lb = upload<float>(ln_bias, ln_out ? channels : 0);
    DevArray<float> x(n);
    DevArray<T> y(ln_out ? n : 0);
    poison(x);
    poison(y);
    launch_embedding<T>(x.get(), ln_out ? y.get() : nullptr, ids->get(), pos->get(), te->get(),
                        pe->get(), lw->get(), lb->get(), num_tokens, channels, eps, kStream);
    CUDA_CHECK(cudaMemcpy(residual, x.get(), n * sizeof(float), cudaMemcpyDeviceToHost));
    if (ln_out) download(ln_out, y.get(), n);
  });
}

void advance_decode_step(int32_t* token_ids, int32_t* positions, int32_t* slot_mapping,
                         int32_t* context_lens, int64_t* counters, int32_t* history,
                         int32_t* next_tokens, const int32_t* next_slots, int32_t* run_step,
                         int num_rows, int num_steps, uint64_t* greedy_keys, float* residual,
                         const float* wte, const float* wpe, int vocab_size, int num_positions,
                         int channels, DType dtype) {
  const size_t S = size_t(num_rows), H = size_t(num_steps) * S;
  auto ids = upload_raw(token_ids, S), pos = upload_raw(positions, S);
  auto slots = upload_raw(slot_mapping, S), lens = upload_raw(context_lens, S);
  auto ctr = upload_raw<int64_t>(counters, counters ? S : 0);
  auto hist = upload_raw(history, H);
  auto next = upload_raw(next_tokens, S), next_sl = upload_raw(next_slots, H);
  auto step = upload_raw(run_step, 1);
  using Key = unsigned long long;
  auto keys = upload_raw<Key>(reinterpret_cast<const Key*>(greedy_keys), greedy_keys ? S : 0);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto te = upload<T>(wte, residual ? size_t(vocab_size) * channels : 0);
    auto pe = upload<T>(wpe, residual ? size_t(num_positions) * channels : 0);
    DevArray<float> x(residual ? S * channels : 0);
    poison(x);
    NextEmbedding<T> embed;
    if (residual) embed = {x.get(), te->get(), pe->get(), channels};
    launch_advance_decode_step<T>(ids->get(), pos->get(), slots->get(), lens->get(),
                                  counters ? ctr->get() : nullptr, hist->get(), next->get(),
                                  greedy_keys ? keys->get() : nullptr, next_sl->get(),
                                  step->get(), num_rows, embed, kStream);
    CUDA_CHECK_LAUNCH();
    if (residual) {
      CUDA_CHECK(cudaMemcpy(residual, x.get(), x.size() * sizeof(float), cudaMemcpyDeviceToHost));
    }
  });
  auto back = [](auto* host, const auto& dev, size_t n) {
    CUDA_CHECK(cudaMemcpy(host, dev->get(), n * sizeof(*host), cudaMemcpyDeviceToHost));
  };
  back(token_ids, ids, S), back(positions, pos, S), back(slot_mapping, slots, S);
  back(context_lens, lens, S), back(history, hist, H), back(run_step, step, 1);
  if (counters) back(counters, ctr, S);
  back(next_tokens, next, S);
  if (greedy_keys) back(reinterpret_cast<Key*>(greedy_keys), keys, S);
}

void matmul(float* out, const float* in, const float* weight, const float* bias, int num_tokens,
            int out_features, int in_features, bool gelu, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto x = upload<T>(in, size_t(num_tokens) * in_features);
    auto w = upload<T>(weight, size_t(out_features) * in_features);
    auto b = upload<T>(bias, bias ? out_features : 0);
    DevArray<T> y(size_t(num_tokens) * out_features);
    poison(y);
    Gemm gemm;
    const Epilogue e = gelu ? Epilogue::kBiasGelu : bias ? Epilogue::kBias : Epilogue::kNone;
    gemm.matmul(y.get(), x->get(), w->get(), bias ? b->get() : nullptr, num_tokens, out_features,
                in_features, dtype, false, e, kStream);
    download(out, y.get(), y.size());
  });
}

int skinny_warps_per_row(int out_features, int in_features, DType dtype) {
  return cuda::skinny_warps_per_row(out_features, in_features, int(dtype_size(dtype)), num_sms());
}

int skinny_resident_rows(int out_features, int in_features, DType dtype) {
  return cuda::skinny_resident_rows(out_features, in_features, int(dtype_size(dtype)), num_sms());
}

void skinny_matmul(float* out, const float* in, const float* weight, const float* bias,
                   const float* ln_weight, const float* ln_bias, float eps,
                   const float* residual, bool gelu, int num_tokens, int out_features,
                   int in_features, DType dtype, int32_t* greedy_tokens, bool resident) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t nx = size_t(num_tokens) * in_features, ny = size_t(num_tokens) * out_features;
    const bool ln = ln_weight != nullptr;
    auto x_f = upload<float>(ln ? in : nullptr, ln ? nx : 0);
    auto x_t = upload<T>(ln ? nullptr : in, ln ? 0 : nx);
    auto w = upload<T>(weight, size_t(out_features) * in_features);
    auto b = upload<T>(bias, bias ? out_features : 0);
    auto lw = upload<float>(ln_weight, ln ? in_features : 0);
    auto lb = upload<float>(ln_bias, ln ? in_features : 0);
    DevArray<float> fold(ln ? 2 * size_t(out_features) : 0);
    if (ln) {
      launch_fold_layernorm<T>(fold.get(), w->get(), lw->get(), lb->get(),
                               bias ? b->get() : nullptr, out_features, in_features, kStream);
    }
    SkinnyParams<T> p;
    p.x = ln ? static_cast<const void*>(x_f->get()) : static_cast<const void*>(x_t->get());
    p.ln_weight = lw->get(), p.ln_fold = fold.get(), p.eps = eps;
    p.weight = w->get(), p.bias = bias ? b->get() : nullptr;
    p.rows = num_tokens, p.N = out_features, p.K = in_features, p.resident = resident;
    SkinnyOutput kind = !bias ? SkinnyOutput::kLogits
                        : residual ? SkinnyOutput::kBiasResidual
                        : gelu ? SkinnyOutput::kBiasGelu
                               : SkinnyOutput::kBias;
    const SkinnyInput input = ln ? SkinnyInput::kLayerNorm : SkinnyInput::kActivation;
    DevArray<unsigned long long> keys(greedy_tokens ? num_tokens : 0);
    if (greedy_tokens) {
      CUDA_CHECK(cudaMemset(keys.get(), 0, num_tokens * sizeof(unsigned long long)));
      p.argmax = keys.get();
    }
    if (kind == SkinnyOutput::kLogits || kind == SkinnyOutput::kBiasResidual) {
      auto y = upload<float>(residual, ny);
      if (!residual) poison(*y);  // logits: fully overwritten
      p.out = y->get();
      launch_skinny_gemm<T>(p, input, kind, num_sms(), kStream);
      CUDA_CHECK(cudaMemcpy(out, y->get(), ny * sizeof(float), cudaMemcpyDeviceToHost));
      if (greedy_tokens) {
        std::vector<unsigned long long> k(num_tokens);
        CUDA_CHECK(cudaMemcpy(k.data(), keys.get(), k.size() * sizeof(k[0]),
                              cudaMemcpyDeviceToHost));
        for (int m = 0; m < num_tokens; ++m) greedy_tokens[m] = k[m] ? key_id(k[m]) : -1;
      }
    } else {
      DevArray<T> y(ny);
      poison(y);
      p.out = y.get();
      launch_skinny_gemm<T>(p, input, kind, num_sms(), kStream);
      download(out, y.get(), ny);
    }
  });
}

void gelu(float* x, int64_t n, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto y = upload<T>(x, size_t(n));
    launch_bias_act<T>(y->get(), nullptr, 1, int(n), true, kStream);
    download(x, y->get(), size_t(n));
  });
}

void write_kv(float* k_cache, float* v_cache, const float* qkv, const int32_t* slot_mapping,
              int num_tokens, int num_heads, int head_size, int64_t cache_elems, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int C = num_heads * head_size;
    auto k = upload<T>(k_cache, size_t(cache_elems)), v = upload<T>(v_cache, size_t(cache_elems));
    auto q = upload<T>(qkv, size_t(num_tokens) * 3 * C);
    auto slots = upload_raw<int32_t>(slot_mapping, num_tokens);
    launch_write_kv<T>(k->get(), v->get(), q->get(), slots->get(), num_tokens, C, kStream);
    download(k_cache, k->get(), size_t(cache_elems));
    download(v_cache, v->get(), size_t(cache_elems));
  });
}

int decode_heads_per_block(int num_seqs, int num_heads) {
  return cuda::decode_heads_per_block(num_seqs, num_heads, num_sms());
}

void paged_attention(float* out, const float* qkv, const float* k_cache, const float* v_cache,
                     const int32_t* positions, const int32_t* query_start_loc,
                     const int32_t* block_tables, int num_seqs, int max_blocks, int num_heads,
                     int head_size, int block_size, int64_t cache_elems, DType dtype,
                     AttentionKernel kernel, int partition_size, int heads_per_block,
                     const int32_t* slot_mapping, float* k_out, float* v_out) {
  const int T_ = query_start_loc[num_seqs];
  bool decode = T_ == num_seqs;
  int max_query = 0;
  std::vector<int32_t> context_lens(num_seqs);
  for (int s = 0; s < num_seqs; ++s) {
    const int q = query_start_loc[s + 1] - query_start_loc[s];
    decode = decode && q == 1;
    max_query = std::max(max_query, q);
    context_lens[s] = q > 0 ? positions[query_start_loc[s + 1] - 1] + 1 : 0;
  }
  if ((kernel == AttentionKernel::kDecode || slot_mapping) && !decode) {
    throw std::invalid_argument("paged_attention: kernel='decode' needs one query per sequence");
  }
  const bool use_decode =
      kernel == AttentionKernel::kDecode || slot_mapping ||
      (kernel == AttentionKernel::kAuto && decode &&
       decode_attention_supported(head_size, int(dtype_size(dtype))));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int C = num_heads * head_size;
    auto q = upload<T>(qkv, size_t(T_) * 3 * C);
    auto k = upload<T>(k_cache, size_t(cache_elems)), v = upload<T>(v_cache, size_t(cache_elems));
    auto pos = upload_raw<int32_t>(positions, T_);
    auto qsl = upload_raw<int32_t>(query_start_loc, num_seqs + 1);
    auto tables = upload_raw<int32_t>(block_tables, size_t(num_seqs) * max_blocks);
    DevArray<T> y(size_t(T_) * C);
    poison(y);
    if (use_decode) {
      auto ctx = upload_raw<int32_t>(context_lens.data(), num_seqs);
      auto slots = upload_raw<int32_t>(slot_mapping, slot_mapping ? num_seqs : 0);
      const DecodePlan plan(context_lens, num_heads, head_size, partition_size, heads_per_block);
      // Launched programmatically, the kernel copies cache rows before it waits: what wrote them
      // (the caches' cast kernels here, earlier steps in the engine) must be done and visible.
      CUDA_CHECK(cudaStreamSynchronize(kStream));
      launch_decode_attention<T>(y.get(), q->get(), k->get(), v->get(), ctx->get(), tables->get(),
                                 slot_mapping ? slots->get() : nullptr, num_seqs, max_blocks,
                                 num_heads, head_size, block_size, plan.max_ctx,
                                 plan.split.partition_size, plan.split.heads_per_block,
                                 plan.scratch.ws, kStream,
                                 /*pdl=*/true);  // as in a step: the first tiles load early
      CUDA_CHECK(cudaDeviceSynchronize());
      if (k_out) download(k_out, k->get(), size_t(cache_elems));
      if (v_out) download(v_out, v->get(), size_t(cache_elems));
    } else {
      launch_prefill_attention<T>(y.get(), q->get(), k->get(), v->get(), pos->get(), qsl->get(),
                                  tables->get(), num_seqs, max_blocks, num_heads, head_size,
                                  block_size, max_query, kStream);
    }
    download(out, y.get(), y.size());
  });
}

void decode_attention_proj(float* residual, const float* qkv, const float* k_cache,
                           const float* v_cache, const int32_t* positions,
                           const int32_t* block_tables, const float* weight, const float* bias,
                           int num_seqs, int max_blocks, int num_heads, int head_size,
                           int block_size, int64_t cache_elems, DType dtype, int partition_size,
                           int heads_per_block) {
  if (num_seqs < 1 || num_seqs > kSkinnyMaxRows) {
    throw std::invalid_argument("decode_attention_proj: 1 to " + std::to_string(kSkinnyMaxRows) +
                                " sequences (the skinny GEMV's rows), got " +
                                std::to_string(num_seqs));
  }
  std::vector<int32_t> context_lens(num_seqs);
  for (int s = 0; s < num_seqs; ++s) context_lens[s] = positions[s] + 1;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int C = num_heads * head_size;
    auto q = upload<T>(qkv, size_t(num_seqs) * 3 * C);
    auto k = upload<T>(k_cache, size_t(cache_elems)), v = upload<T>(v_cache, size_t(cache_elems));
    auto ctx = upload_raw<int32_t>(context_lens.data(), num_seqs);
    auto tables = upload_raw<int32_t>(block_tables, size_t(num_seqs) * max_blocks);
    auto w = upload<T>(weight, size_t(C) * C);
    auto b = upload<T>(bias, size_t(C));
    auto res = upload<float>(residual, size_t(num_seqs) * C);
    DevArray<T> unused(size_t(num_seqs) * C);  // out: not written when the GEMV merges
    poison(unused);
    const DecodePlan plan(context_lens, num_heads, head_size, partition_size, heads_per_block);
    CUDA_CHECK(cudaStreamSynchronize(kStream));  // the caches' casts, as in paged_attention
    launch_decode_attention<T>(unused.get(), q->get(), k->get(), v->get(), ctx->get(),
                               tables->get(), nullptr, num_seqs, max_blocks, num_heads,
                               head_size, block_size, plan.max_ctx, plan.split.partition_size,
                               plan.split.heads_per_block, plan.scratch.ws, kStream,
                               /*pdl=*/true, {}, /*merge_later=*/true);
    SkinnyParams<T> p;
    p.partials = plan.scratch.ws, p.context_lens = ctx->get(), p.head_size = head_size;
    p.partition_size = plan.split.partition_size, p.max_partitions = plan.num_parts;
    p.weight = w->get(), p.bias = b->get(), p.out = res->get();
    p.rows = num_seqs, p.N = C, p.K = C;
    launch_skinny_gemm<T>(p, SkinnyInput::kAttentionPartials, SkinnyOutput::kBiasResidual,
                          num_sms(), kStream, /*pdl=*/true);
    CUDA_CHECK(cudaMemcpy(residual, res->get(), size_t(num_seqs) * C * sizeof(float),
                          cudaMemcpyDeviceToHost));
  });
}

void sample(int32_t* next_tokens, const float* logits, const SamplingInputs& params,
            int num_rows, int vocab_size, DType dtype) {
  auto temperature = upload_raw<float>(params.temperature, num_rows);
  auto top_k = upload_raw<int32_t>(params.top_k, num_rows);
  auto top_p = upload_raw<float>(params.top_p, num_rows);
  auto seeds = upload_raw<uint64_t>(params.seeds, num_rows);
  auto counters = upload_raw<int64_t>(params.counters, num_rows);
  DevArray<int32_t> out(num_rows);
  poison(out);  // -1
  DeviceSampling p{temperature->get(), top_k->get(), top_p->get(), seeds->get(), counters->get()};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {  // in place, as the float32 LM head leaves them
      auto x = upload_raw<float>(logits, size_t(num_rows) * vocab_size);
      launch_sample<float>(out.get(), x->get(), vocab_size, x->get(), p, num_rows, vocab_size,
                           kStream);
    } else {
      const int ld = (vocab_size + 7) / 8 * 8;
      std::vector<float> padded(size_t(num_rows) * ld, 6e4f);
      for (int r = 0; r < num_rows; ++r) {
        std::memcpy(&padded[size_t(r) * ld], logits + size_t(r) * vocab_size,
                    sizeof(float) * vocab_size);
      }
      auto x = upload<T>(padded.data(), padded.size());
      DevArray<float> scratch(size_t(num_rows) * vocab_size);
      launch_sample<T>(out.get(), x->get(), ld, scratch.get(), p, num_rows, vocab_size, kStream);
    }
  });
  CUDA_CHECK(cudaMemcpy(next_tokens, out.get(), size_t(num_rows) * 4, cudaMemcpyDeviceToHost));
}

void copy_blocks(float* cache, int num_blocks, int64_t block_elems, const int32_t* src,
                 const int32_t* dst, int num_copies, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t n = size_t(num_blocks) * block_elems;
    auto c = upload<T>(cache, n);
    auto s = upload_raw<int32_t>(src, num_copies), d = upload_raw<int32_t>(dst, num_copies);
    launch_copy_blocks(c->get(), int64_t(n * sizeof(T)), block_elems * int64_t(sizeof(T)), 1,
                       s->get(), d->get(), num_copies, kStream);
    download(cache, c->get(), n);
  });
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

namespace {

std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = float(uniform_from_counter(seed, int64_t(i)) * 2.0 - 1.0);
  return x;
}

// One link of a chain of dependent kernels, the least a step's kernel does: wait for the kernel
// before, read a value another block of it wrote, write one for the next kernel. The two halves
// of `values` alternate between links (link i reads half i % 2 and writes the other).
// prefetch: asked of L2 by the blocks together before they wait, as the skinny GEMV asks for the
// next GEMVs' weights (does a kernel end later while its prefetches are in flight?).
__global__ void dependent_link_kernel(int* values, int link, L2Range prefetch) {
  pdl_launch_dependents();
  prefetch_l2_share(prefetch);
  pdl_wait();
  if (threadIdx.x == 0) {
    const int* in = values + (link % 2) * gridDim.x;
    int* out = values + (1 - link % 2) * gridDim.x;
    out[blockIdx.x] = in[(blockIdx.x + 1) % gridDim.x] + 1;
  }
}

// `rounds` grid-wide barriers inside one kernel (every block resident: launched cooperatively),
// each the same hand-over as a link above: a value written before the barrier, another block's
// read after it. Arrival is a release add on one counter, the wait an acquire spin on it.
__global__ void grid_barrier_kernel(unsigned* counter, int* values, int rounds) {
  for (int r = 0; r < rounds; ++r) {
    __syncthreads();  // the block's work of this round is done
    if (threadIdx.x == 0) {
      int* mine = values + (r % 2) * gridDim.x;
      mine[blockIdx.x] += 1;
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
      const unsigned target = unsigned(r + 1) * gridDim.x;
      unsigned seen = 0;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
      } while (seen < target);
      values[(1 - r % 2) * gridDim.x + blockIdx.x] = mine[(blockIdx.x + 1) % gridDim.x];
    }
  }
}

}  // namespace

double time_dependency(bool barrier, int blocks_per_sm, int threads, int rounds, int iters,
                       int prefetch_mb) {
  const int blocks = blocks_per_sm * num_sms();
  DevArray<int> values(2 * size_t(blocks));
  DevArray<unsigned> counter(1);
  CUDA_CHECK(cudaMemset(values.get(), 0, values.size() * sizeof(int)));
  if (!barrier) {
    // Links ask for consecutive prefetch_mb slices of 256 MB (more than L2 holds), as a step's
    // GEMVs ask for the next weights.
    const size_t slice = size_t(prefetch_mb) << 20;
    const size_t slices = slice ? std::max<size_t>(1, (size_t(256) << 20) / slice) : 1;
    DevArray<char> weights(slice * slices);
    return graph_median_ms(kStream, iters, rounds, [&](int i, cudaStream_t capture) {
      const L2Range prefetch{weights.get() + (size_t(i) % slices) * slice, slice};
      launch_kernel(dependent_link_kernel, dim3(blocks), dim3(threads), 0, capture,
                    /*pdl=*/true, values.get(), i, prefetch);
    }) * 1e3;
  }
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, grid_barrier_kernel,
                                                           threads, 0));
  if (blocks_per_sm > per_sm) {
    throw std::invalid_argument("time_dependency: " + std::to_string(blocks_per_sm) +
                                " blocks an SM of " + std::to_string(threads) +
                                " threads do not fit at once (at most " + std::to_string(per_sm) +
                                ")");
  }
  unsigned* counter_ptr = counter.get();
  int* values_ptr = values.get();
  void* args[] = {&counter_ptr, &values_ptr, &rounds};
  return median_ms(kStream, iters, [&] {
           CUDA_CHECK(cudaMemsetAsync(counter_ptr, 0, sizeof(unsigned), kStream));
           CUDA_CHECK(cudaLaunchCooperativeKernel(
               reinterpret_cast<const void*>(grid_barrier_kernel), dim3(blocks), dim3(threads),
               args, 0, kStream));
         }) * 1e3 / rounds;
}

double time_decode_attention(int num_seqs, int context_len, int num_heads, int head_size,
                             int block_size, DType dtype, int iters, int partition_size,
                             int heads_per_block, int copies) {
  const int C = num_heads * head_size;
  const int blocks_per_seq = (context_len + block_size - 1) / block_size;
  const int num_blocks = num_seqs * blocks_per_seq;
  std::vector<int32_t> ids(num_blocks);
  for (int i = 0; i < num_blocks; ++i) ids[i] = i;
  for (int i = num_blocks - 1; i > 0; --i) {  // shuffled: a sequence's blocks are scattered
    std::swap(ids[i], ids[int(uniform_from_counter(7, i) * (i + 1))]);
  }
  std::vector<int32_t> context_lens(num_seqs, context_len);
  double ms = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t cache_elems = size_t(num_blocks) * block_size * C;
    // copies = 0: enough caches (256 MB in all, at most 32) that a graph of launches, each on
    // the next, does not find its rows in L2 (50-60 MB on Hopper), as in a model step; only
    // caches under 2 MB (batch 1 at short contexts) still fit there 32 times. 1: one cache,
    // launches timed alone.
    const size_t cache_bytes = 2 * cache_elems * sizeof(T);
    const int n = copies > 0 ? copies
                             : int(std::min<size_t>(32, (size_t(256) << 20) / cache_bytes + 1));
    auto q = upload<T>(random_floats(size_t(num_seqs) * 3 * C, 1).data(), size_t(num_seqs) * 3 * C);
    const std::vector<float> k_host = random_floats(cache_elems, 2);
    const std::vector<float> v_host = random_floats(cache_elems, 3);
    std::vector<std::unique_ptr<DevArray<T>>> k, v;
    for (int c = 0; c < n; ++c) {
      k.push_back(upload<T>(k_host.data(), cache_elems));
      v.push_back(upload<T>(v_host.data(), cache_elems));
    }
    auto tables = upload_raw<int32_t>(ids.data(), ids.size());
    auto ctx = upload_raw<int32_t>(context_lens.data(), num_seqs);
    DevArray<T> y(size_t(num_seqs) * C);
    const DecodeSplit split =
        decode_split(num_seqs, num_heads, context_len, partition_size, heads_per_block);
    DecodeScratch scratch(num_seqs, num_heads, head_size,
                          decode_num_partitions(context_len, split.partition_size));
    auto launch = [&](int c, cudaStream_t stream) {
      launch_decode_attention<T>(y.get(), q->get(), k[c]->get(), v[c]->get(), ctx->get(),
                                 tables->get(), nullptr, num_seqs, blocks_per_seq, num_heads,
                                 head_size, block_size, context_len, split.partition_size,
                                 split.heads_per_block, scratch.ws, stream);
    };
    if (n == 1) {
      ms = median_ms(kStream, iters, [&] { launch(0, kStream); });
      return;
    }
    ms = graph_median_ms(kStream, iters, n, launch);
  });
  return ms;
}

double time_skinny_gemm(int rows, int out_features, int in_features, int chain, int iters,
                        int warps_per_row, int prefetch_mb, bool l2_resident) {
  using T = __half;
  const size_t w_elems = size_t(out_features) * in_features;
  // Enough weight copies that a chain of 64 never finds its weights in L2 (50-60 MB on Hopper).
  const size_t copies_for_256mb = (size_t(256) << 20) / (w_elems * sizeof(T)) + 1;
  chain = std::max(chain, int(std::min<size_t>(64, copies_for_256mb)));
  const int copies = l2_resident ? 1 : chain;
  DevArray<T> w(w_elems * copies);
  CUDA_CHECK(cudaMemset(w.get(), 0x3c, w.size() * sizeof(T)));  // 1.0 + small: finite sums
  auto x = upload<T>(random_floats(size_t(rows) * in_features, 4).data(),
                     size_t(rows) * in_features);
  auto b = upload<T>(random_floats(size_t(out_features), 5).data(), size_t(out_features));
  DevArray<T> y(size_t(rows) * out_features);
  SkinnyParams<T> p;
  p.x = x->get(), p.bias = b->get(), p.out = y.get();
  p.rows = rows, p.N = out_features, p.K = in_features;
  p.warps_per_row = warps_per_row;
  // The chain is replayed from a CUDA graph, as the model's steps are: the host's launch rate
  // (a few us a launch) does not bound it.
  const int sms = num_sms();
  return graph_median_ms(kStream, iters, chain, [&](int i, cudaStream_t capture) {
    p.weight = w.get() + size_t(i % copies) * w_elems;
    // The next GEMVs' weights, as a step's GEMVs ask for theirs (none after the last).
    const size_t bytes_after = w_elems * sizeof(T) * (copies - 1 - i % copies);
    p.prefetch = {p.weight + w_elems, std::min(size_t(prefetch_mb) << 20, bytes_after)};
    launch_skinny_gemm<T>(p, SkinnyInput::kActivation, SkinnyOutput::kBias, sms, capture,
                          /*pdl=*/true);
  });
}

double copy_bandwidth_gbs(int64_t bytes, int iters) {
  DevArray<char> a(bytes), b(bytes);
  CUDA_CHECK(cudaMemset(a.get(), 1, bytes));
  const double ms = median_ms(kStream, iters, [&] {
    CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, kStream));
  });
  return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

}  // namespace pagedgpt2::cuda::ops

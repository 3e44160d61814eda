// pagedgpt2._cuda: the CUDA backend (CudaModel, with the same Python surface as CpuModel through
// bind_model_methods) and `ops`, every CUDA kernel over float32 numpy arrays for the kernel tests,
// with the CPU reference ops' names and argument order plus a `dtype` keyword.
// Exports only; the logic lives in cpp/cuda. Imported only when a user asks for device="cuda".
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "bindings/model_binding.h"
#include "cuda/cuda_model.h"
#include "cuda/ops.h"
#include "cuda/sampling_host.h"
#include "cuda/stage_trace.cuh"

namespace nb = nanobind;
using namespace nb::literals;
using namespace pagedgpt2;
using bindings::check_len;
using bindings::copy_of;
using bindings::FloatTensor;
using bindings::owned_array;
using bindings::FloatArray;
using bindings::I64Array;
using bindings::IntArray;
using bindings::IntMatrix;
using bindings::U64Array;

namespace {

cuda::DType dt(const std::string& name) { return cuda::parse_dtype(name); }

// paged_attention and decode_attention_write_kv: shape checks, then ops::paged_attention.
nb::ndarray<nb::numpy, float> attention_op(FloatTensor qkv, FloatTensor k_cache,
                                           FloatTensor v_cache, IntArray positions,
                                           const int32_t* query_start_loc, int S,
                                           IntMatrix block_tables,
                                           int num_heads, const std::string& dtype,
                                           cuda::ops::AttentionKernel which, int partition_size,
                                           int heads_per_block, const int32_t* slot_mapping,
                                           float* k_out, float* v_out) {
  if (k_cache.ndim() != 4 || qkv.ndim() != 2) {
    throw std::invalid_argument(
        "paged_attention: caches [num_blocks, block_size, H, D], qkv [T, 3C]");
  }
  const int T = int(qkv.shape(0)), C = int(qkv.shape(1)) / 3, D = C / num_heads;
  check_len("positions", positions.shape(0), T);
  check_len("block_tables rows", block_tables.shape(0), S);
  check_len("v_cache", v_cache.size(), k_cache.size());
  if (query_start_loc[S] != T) {
    throw std::invalid_argument("paged_attention: query_start_loc[-1] != num tokens");
  }
  auto out = owned_array<float>({size_t(T), size_t(C)});
  cuda::ops::paged_attention(out.data(), qkv.data(), k_cache.data(), v_cache.data(),
                             positions.data(), query_start_loc, block_tables.data(), S,
                             int(block_tables.shape(1)), num_heads, D, int(k_cache.shape(1)),
                             int64_t(k_cache.size()), dt(dtype), which, partition_size,
                             heads_per_block, slot_mapping, k_out, v_out);
  return out;
}

cuda::ops::Handover handover_kind(const std::string& kind) {
  if (kind == "kernel") return cuda::ops::Handover::kKernel;
  if (kind == "barrier") return cuda::ops::Handover::kBarrier;
  if (kind == "tagged") return cuda::ops::Handover::kTagged;
  throw std::invalid_argument("kind must be 'kernel', 'barrier' or 'tagged', got '" + kind + "'");
}

void check_handover(int width, int blocks_per_sm, int threads, int rounds) {
  if (width < 32 || width > 8192 || blocks_per_sm < 1 || threads < 32 || threads > 1024 ||
      threads % 32 != 0 || rounds < 1) {
    throw std::invalid_argument(
        "handover: need width in [32, 8192], blocks_per_sm >= 1, threads a multiple of 32 in "
        "[32, 1024] and rounds >= 1; got width " + std::to_string(width) + ", blocks_per_sm " +
        std::to_string(blocks_per_sm) + ", threads " + std::to_string(threads) + ", rounds " +
        std::to_string(rounds));
  }
}

void check_gemv_layers(const std::string& kind, int width, int layers) {
  if (kind != "kernels" && kind != "persistent") {
    throw std::invalid_argument("kind must be 'kernels' or 'persistent', got '" + kind + "'");
  }
  if (width < 64 || width % 64 != 0 || layers < 1 || layers > 64) {
    throw std::invalid_argument("gemv layers: need width a multiple of 64 (at least 64) and "
                                "layers in [1, 64]; got width " + std::to_string(width) +
                                ", layers " + std::to_string(layers));
  }
}

void bind_ops(nb::module_& m) {
  nb::module_ ops = m.def_submodule(
      "ops", "CUDA kernels over float32 numpy arrays (cast to `dtype` on the device).");
  ops.def(
      "layernorm",
      [](FloatTensor in, FloatTensor w, FloatTensor b, float eps, std::string dtype) {
        const int C = int(in.shape(in.ndim() - 1)), T = int(in.size() / C);
        check_len("weight", w.size(), C);
        check_len("bias", b.size(), C);
        auto out = copy_of(in);
        cuda::ops::layernorm(out.data(), in.data(), w.data(), b.data(), T, C, eps, dt(dtype));
        return out;
      },
      "input"_a, "weight"_a, "bias"_a, "eps"_a, nb::kw_only(), "dtype"_a = "float32");
  ops.def(
      "add_layernorm",
      [](FloatTensor residual, std::optional<FloatTensor> delta, std::optional<FloatTensor> w,
         std::optional<FloatTensor> b, std::optional<IntArray> rows, float eps,
         std::string dtype) -> nb::object {
        if (residual.ndim() != 2) throw std::invalid_argument("add_layernorm: residual [T, C]");
        const int T = int(residual.shape(0)), C = int(residual.shape(1));
        const int R = rows ? int(rows->shape(0)) : T;
        if (delta) check_len("delta", delta->size(), size_t(T) * C);
        if (bool(w) != bool(b)) {
          throw std::invalid_argument("add_layernorm: weight and bias go together");
        }
        if (w) check_len("weight", w->size(), C), check_len("bias", b->size(), C);
        for (int r = 0; rows && r < R; ++r) {
          if (rows->data()[r] < 0 || rows->data()[r] >= T) {
            throw std::invalid_argument("add_layernorm: rows must be in [0, T)");
          }
        }
        auto res = copy_of(residual);
        auto out = owned_array<float>({size_t(w ? R : 0), size_t(C)});
        cuda::ops::add_layernorm(res.data(), delta ? delta->data() : nullptr,
                                 w ? out.data() : nullptr, w ? w->data() : nullptr,
                                 b ? b->data() : nullptr, rows ? rows->data() : nullptr, T, R, C,
                                 eps, dt(dtype));
        return nb::make_tuple(res, w ? nb::object(nb::cast(out)) : nb::none());
      },
      "residual"_a, "delta"_a.none() = nb::none(), "weight"_a.none() = nb::none(),
      "bias"_a.none() = nb::none(), "rows"_a.none() = nb::none(), "eps"_a = 1e-5f, nb::kw_only(),
      "dtype"_a = "float32",
      "The model's add+LayerNorm: returns (residual + delta at the rows, LayerNorm of those rows "
      "or None without weight).");
  ops.def(
      "embedding",
      [](IntArray token_ids, IntArray positions, FloatTensor wte, FloatTensor wpe,
         std::optional<FloatTensor> ln_w, std::optional<FloatTensor> ln_b, float eps,
         std::string dtype) -> nb::object {
        if (wte.ndim() != 2 || wpe.ndim() != 2) {
          throw std::invalid_argument("embedding: wte [V, C], wpe [P, C]");
        }
        const int T = int(token_ids.shape(0)), V = int(wte.shape(0)), P = int(wpe.shape(0));
        const int C = int(wte.shape(1));
        check_len("positions", positions.shape(0), T);
        check_len("wpe columns", wpe.shape(1), C);
        if (bool(ln_w) != bool(ln_b)) {
          throw std::invalid_argument("embedding: ln_weight and ln_bias go together");
        }
        if (ln_w) check_len("ln_weight", ln_w->size(), C), check_len("ln_bias", ln_b->size(), C);
        for (int t = 0; t < T; ++t) {
          if (token_ids.data()[t] < 0 || token_ids.data()[t] >= V || positions.data()[t] < 0 ||
              positions.data()[t] >= P) {
            throw std::invalid_argument("embedding: token id or position out of range");
          }
        }
        auto res = owned_array<float>({size_t(T), size_t(C)});
        auto ln = owned_array<float>({size_t(ln_w ? T : 0), size_t(C)});
        cuda::ops::embedding(res.data(), ln_w ? ln.data() : nullptr, token_ids.data(),
                             positions.data(), wte.data(), wpe.data(),
                             ln_w ? ln_w->data() : nullptr, ln_b ? ln_b->data() : nullptr, T, V,
                             P, C, eps, dt(dtype));
        return nb::make_tuple(res, ln_w ? nb::object(nb::cast(ln)) : nb::none());
      },
      "token_ids"_a, "positions"_a, "wte"_a, "wpe"_a, "ln_weight"_a.none() = nb::none(),
      "ln_bias"_a.none() = nb::none(), "eps"_a = 1e-5f, nb::kw_only(), "dtype"_a = "float32",
      "Returns (wte[token_ids] + wpe[positions] in float32, its LayerNorm or None).");
  ops.def(
      "advance_decode_step",
      [](IntArray token_ids, IntArray positions, IntArray slot_mapping, IntArray context_lens,
         std::optional<I64Array> counters, IntMatrix history, IntArray next_tokens,
         IntMatrix next_slots, int run_step, std::optional<U64Array> greedy_keys,
         std::optional<FloatTensor> wte, std::optional<FloatTensor> wpe, std::string dtype) {
        const size_t S = token_ids.shape(0), steps = history.shape(0);
        check_len("positions", positions.shape(0), S);
        check_len("slot_mapping", slot_mapping.shape(0), S);
        check_len("context_lens", context_lens.shape(0), S);
        if (counters) check_len("counters", counters->shape(0), S);
        check_len("history columns", history.shape(1), S);
        check_len("next_tokens", next_tokens.shape(0), S);
        if (greedy_keys) check_len("greedy_keys", greedy_keys->shape(0), S);
        if (bool(wte) != bool(wpe) || (wte && (wte->ndim() != 2 || wpe->ndim() != 2))) {
          throw std::invalid_argument(
              "advance_decode_step: wte [V, C] and wpe [P, C] go together");
        }
        const size_t C = wte ? wte->shape(1) : 0;
        if (wte) check_len("wpe columns", wpe->shape(1), C);
        check_len("next_slots", next_slots.size(), steps * S);
        if (run_step < 0 || size_t(run_step) >= steps) {
          throw std::invalid_argument("advance_decode_step: run_step must be in [0, steps)");
        }
        auto copy = [](const int32_t* src, std::vector<size_t> shape) {
          auto a = owned_array<int32_t>(shape);
          std::memcpy(a.data(), src, a.size() * sizeof(int32_t));
          return a;
        };
        auto ids = copy(token_ids.data(), {S}), pos = copy(positions.data(), {S});
        auto slots = copy(slot_mapping.data(), {S}), lens = copy(context_lens.data(), {S});
        auto hist = copy(history.data(), {steps, S});
        auto next = copy(next_tokens.data(), {S});
        auto keys = owned_array<uint64_t>({greedy_keys ? S : 0});
        if (greedy_keys) std::memcpy(keys.data(), greedy_keys->data(), S * sizeof(uint64_t));
        auto ctr = owned_array<int64_t>({counters ? S : 0});
        if (counters) std::memcpy(ctr.data(), counters->data(), S * sizeof(int64_t));
        int32_t step = run_step;
        auto residual = owned_array<float>({wte ? S : 0, C});
        cuda::ops::advance_decode_step(ids.data(), pos.data(), slots.data(), lens.data(),
                                       counters ? ctr.data() : nullptr, hist.data(),
                                       next.data(), next_slots.data(), &step, int(S),
                                       int(steps), greedy_keys ? keys.data() : nullptr,
                                       wte ? residual.data() : nullptr,
                                       wte ? wte->data() : nullptr, wpe ? wpe->data() : nullptr,
                                       wte ? int(wte->shape(0)) : 0, wpe ? int(wpe->shape(0)) : 0,
                                       int(C), dt(dtype));
        nb::dict out;
        out["token_ids"] = ids, out["positions"] = pos, out["slot_mapping"] = slots;
        out["context_lens"] = lens, out["history"] = hist, out["run_step"] = step;
        out["counters"] = counters ? nb::object(nb::cast(ctr)) : nb::none();
        out["next_tokens"] = next;
        out["greedy_keys"] = greedy_keys ? nb::object(nb::cast(keys)) : nb::none();
        out["residual"] = wte ? nb::object(nb::cast(residual)) : nb::none();
        return out;
      },
      "token_ids"_a, "positions"_a, "slot_mapping"_a, "context_lens"_a, "counters"_a.none(),
      "history"_a, "next_tokens"_a, "next_slots"_a, "run_step"_a,
      "greedy_keys"_a.none() = nb::none(), "wte"_a.none() = nb::none(),
      "wpe"_a.none() = nb::none(), "dtype"_a = "float32",
      "One decode-run step advance on copies of the arrays: returns them advanced, as a dict. "
      "greedy_keys (uint64, the LM head's argmax keys): the step's tokens are taken from them, "
      "and they come back reset to 0. wte, wpe (cast to dtype): the next step's x is embedded "
      "too, returned as residual [S, C].");
  ops.def(
      "matmul",
      [](FloatTensor in, FloatTensor w, std::optional<FloatTensor> bias, bool gelu,
         std::string dtype) {
        if (in.ndim() != 2 || w.ndim() != 2) throw std::invalid_argument("matmul: 2-D arrays");
        const int T = int(in.shape(0)), K = int(in.shape(1)), N = int(w.shape(0));
        check_len("weight columns", w.shape(1), K);
        if (bias) check_len("bias", bias->size(), N);
        if (gelu && !bias) throw std::invalid_argument("matmul: gelu=True needs a bias");
        auto out = owned_array<float>({size_t(T), size_t(N)});
        cuda::ops::matmul(out.data(), in.data(), w.data(), bias ? bias->data() : nullptr, T, N, K,
                          gelu, dt(dtype));
        return out;
      },
      "input"_a, "weight"_a, "bias"_a.none() = nb::none(), nb::kw_only(), "gelu"_a = false,
      "dtype"_a = "float32",
      "cuBLASLt: input @ weight.T (+ bias) (then tanh-GELU, in the GEMM epilogue).");
  ops.def(
      "skinny_matmul",
      [](FloatTensor in, FloatTensor w, std::optional<FloatTensor> bias,
         std::optional<FloatTensor> ln_weight, std::optional<FloatTensor> ln_bias, float eps,
         std::optional<FloatTensor> residual, bool gelu, std::string dtype,
         bool greedy, bool resident) -> nb::object {
        if (in.ndim() != 2 || w.ndim() != 2) throw std::invalid_argument("skinny_matmul: 2-D");
        const int T = int(in.shape(0)), K = int(in.shape(1)), N = int(w.shape(0));
        check_len("weight columns", w.shape(1), K);
        if (bias) check_len("bias", bias->size(), N);
        if (bool(ln_weight) != bool(ln_bias)) {
          throw std::invalid_argument("skinny_matmul: ln_weight and ln_bias go together");
        }
        if (ln_weight) check_len("ln_weight", ln_weight->size(), K);
        if (ln_bias) check_len("ln_bias", ln_bias->size(), K);
        if (residual) check_len("residual", residual->size(), size_t(T) * N);
        if ((gelu || residual) && !bias) {
          throw std::invalid_argument("skinny_matmul: gelu / residual need a bias");
        }
        if (greedy && bias) {
          throw std::invalid_argument("skinny_matmul: greedy=True takes logits (no bias)");
        }
        auto out = owned_array<float>({size_t(T), size_t(N)});
        auto tokens = owned_array<int32_t>({greedy ? size_t(T) : 0});
        cuda::ops::skinny_matmul(out.data(), in.data(), w.data(), bias ? bias->data() : nullptr,
                                 ln_weight ? ln_weight->data() : nullptr,
                                 ln_bias ? ln_bias->data() : nullptr, eps,
                                 residual ? residual->data() : nullptr, gelu, T, N, K,
                                 dt(dtype), greedy ? tokens.data() : nullptr, resident);
        if (greedy) return nb::make_tuple(out, tokens);
        return nb::cast(out);
      },
      "input"_a, "weight"_a, "bias"_a.none() = nb::none(), nb::kw_only(),
      "ln_weight"_a.none() = nb::none(), "ln_bias"_a.none() = nb::none(), "eps"_a = 1e-5f,
      "residual"_a.none() = nb::none(), "gelu"_a = false, "dtype"_a = "float32",
      "greedy"_a = false, "resident"_a = false,
      "The decode GEMV (<= 8 rows): [residual +] [gelu](LN?(input) @ weight.T + bias); no bias: "
      "float32 logits. greedy=True (logits): returns (logits, tokens), tokens [T] int32 being "
      "each row's greedy token as the kernel reduces it while writing the logits. "
      "resident=True: at one row, the resident variant where skinny_resident_rows is not 0.");
  // What the skinny GEMV's launcher picks for an [out_features, in_features] weight on this GPU.
  using Pick = int (*)(int, int, cuda::DType);
  auto def_skinny_pick = [&](const char* name, Pick pick, const char* doc) {
    ops.def(
        name,
        [pick](int out_features, int in_features, std::string dtype) {
          return pick(out_features, in_features, dt(dtype));
        },
        "out_features"_a, "in_features"_a, "dtype"_a, doc);
  };
  def_skinny_pick("skinny_warps_per_row", cuda::ops::skinny_warps_per_row,
                  "Warps a row (splitting K) the streaming skinny GEMV picks for this weight "
                  "shape on this GPU.");
  def_skinny_pick("skinny_resident_rows", cuda::ops::skinny_resident_rows,
                  "Rows a warp of the resident batch-1 GEMV for this weight shape on this GPU "
                  "(0: the streaming kernel runs instead).");
  ops.def(
      "gelu",
      [](FloatTensor x, std::string dtype) {
        auto out = copy_of(x);
        cuda::ops::gelu(out.data(), int64_t(x.size()), dt(dtype));
        return out;
      },
      "x"_a, nb::kw_only(), "dtype"_a = "float32");
  ops.def(
      "write_kv",
      [](FloatTensor k_cache, FloatTensor v_cache, FloatTensor qkv, IntArray slot_mapping,
         int num_heads, std::string dtype) {
        if (k_cache.ndim() != 4 || qkv.ndim() != 2) {
          throw std::invalid_argument(
              "write_kv: caches [num_blocks, block_size, H, D], qkv [T, 3C]");
        }
        check_len("v_cache", v_cache.size(), k_cache.size());
        const int T = int(qkv.shape(0)), D = int(qkv.shape(1)) / 3 / num_heads;
        check_len("slot_mapping", slot_mapping.shape(0), T);
        auto k = copy_of(k_cache), v = copy_of(v_cache);
        cuda::ops::write_kv(k.data(), v.data(), qkv.data(), slot_mapping.data(), T, num_heads, D,
                            int64_t(k_cache.size()), dt(dtype));
        return nb::make_tuple(k, v);
      },
      "k_cache"_a, "v_cache"_a, "qkv"_a, "slot_mapping"_a, "num_heads"_a, nb::kw_only(),
      "dtype"_a = "float32");
  ops.def(
      "paged_attention",
      [](FloatTensor qkv, FloatTensor k_cache, FloatTensor v_cache, IntArray positions,
         IntArray query_start_loc, IntMatrix block_tables, int num_heads, std::string dtype,
         std::string kernel, int partition_size, int heads_per_block) {
        cuda::ops::AttentionKernel which;
        if (kernel == "auto") which = cuda::ops::AttentionKernel::kAuto;
        else if (kernel == "decode") which = cuda::ops::AttentionKernel::kDecode;
        else if (kernel == "prefill") which = cuda::ops::AttentionKernel::kPrefill;
        else throw std::invalid_argument("kernel must be 'auto', 'decode' or 'prefill'");
        return attention_op(qkv, k_cache, v_cache, positions, query_start_loc.data(),
                            int(query_start_loc.shape(0)) - 1, block_tables, num_heads, dtype,
                            which, partition_size, heads_per_block, nullptr, nullptr, nullptr);
      },
      "qkv"_a, "k_cache"_a, "v_cache"_a, "positions"_a, "query_start_loc"_a, "block_tables"_a,
      "num_heads"_a, nb::kw_only(), "dtype"_a = "float32", "kernel"_a = "auto",
      "partition_size"_a = 0, "heads_per_block"_a = 0,
      "kernel: 'auto' (decode kernel when every sequence has one query), 'decode', 'prefill'; "
      "partition_size: tokens per decode thread block; heads_per_block: heads per decode thread "
      "block, 1 or 4 (0 = as the model picks). The decode kernel reads each sequence's newest "
      "K/V from its qkv row, as the engine does: the cache's slot must hold the same values.");
  ops.def(
      "decode_attention_write_kv",
      [](FloatTensor qkv, FloatTensor k_cache, FloatTensor v_cache, IntArray positions,
         IntArray slot_mapping, IntMatrix block_tables, int num_heads, std::string dtype,
         int partition_size, int heads_per_block) {
        const size_t S = positions.shape(0);
        check_len("slot_mapping", slot_mapping.shape(0), S);
        std::vector<int32_t> query_start_loc(S + 1);  // one query per sequence
        for (size_t i = 0; i <= S; ++i) query_start_loc[i] = int32_t(i);
        // The caches after the kernel (fully written by the op).
        const std::vector<size_t> shape(k_cache.shape_ptr(), k_cache.shape_ptr() + k_cache.ndim());
        auto k = owned_array<float>(shape), v = owned_array<float>(shape);
        auto out = attention_op(qkv, k_cache, v_cache, positions, query_start_loc.data(), int(S),
                                block_tables, num_heads, dtype, cuda::ops::AttentionKernel::kDecode,
                                partition_size, heads_per_block, slot_mapping.data(), k.data(),
                                v.data());
        return nb::make_tuple(out, k, v);
      },
      "qkv"_a, "k_cache"_a, "v_cache"_a, "positions"_a, "slot_mapping"_a, "block_tables"_a,
      "num_heads"_a, nb::kw_only(), "dtype"_a = "float32", "partition_size"_a = 0,
      "heads_per_block"_a = 0,
      "The decode kernel doing write_kv itself, as in a wide decode step: returns (out, k_cache, "
      "v_cache), sequence s's new K/V (its qkv row) written to slot_mapping[s] (-1: not).");
  ops.def(
      "decode_attention_proj",
      [](FloatTensor qkv, FloatTensor k_cache, FloatTensor v_cache, IntArray positions,
         IntMatrix block_tables, int num_heads, FloatTensor weight, FloatArray bias,
         FloatTensor residual, std::string dtype, int partition_size, int heads_per_block) {
        if (k_cache.ndim() != 4 || qkv.ndim() != 2 || residual.ndim() != 2) {
          throw std::invalid_argument(
              "decode_attention_proj: caches [num_blocks, block_size, H, D], qkv [S, 3C], "
              "residual [S, C]");
        }
        const int S = int(qkv.shape(0)), C = int(qkv.shape(1)) / 3;
        if (num_heads <= 0 || C % num_heads != 0 || int(k_cache.shape(2)) != num_heads ||
            int(k_cache.shape(3)) * num_heads != C) {
          throw std::invalid_argument("decode_attention_proj: caches [.., .., H, D], qkv [S, 3HD]");
        }
        check_len("positions", positions.shape(0), S);
        check_len("block_tables rows", block_tables.shape(0), S);
        check_len("v_cache", v_cache.size(), k_cache.size());
        check_len("weight", weight.size(), size_t(C) * C);
        check_len("bias", bias.shape(0), C);
        check_len("residual", residual.size(), size_t(S) * C);
        auto out = copy_of(residual);
        cuda::ops::decode_attention_proj(
            out.data(), qkv.data(), k_cache.data(), v_cache.data(), positions.data(),
            block_tables.data(), weight.data(), bias.data(), S, int(block_tables.shape(1)),
            num_heads, C / num_heads, int(k_cache.shape(1)), int64_t(k_cache.size()), dt(dtype),
            partition_size, heads_per_block);
        return out;
      },
      "qkv"_a, "k_cache"_a, "v_cache"_a, "positions"_a, "block_tables"_a, "num_heads"_a,
      "weight"_a, "bias"_a, "residual"_a, nb::kw_only(), "dtype"_a = "float32",
      "partition_size"_a = 0, "heads_per_block"_a = 0,
      "A skinny decode step's attention then proj, the attention's partitions merged by the "
      "proj GEMV: returns residual + attention @ weight^T + bias (one query per sequence, at "
      "positions[s]; its K/V in its qkv row and its cache slot).");
  ops.def(
      "sample",
      [](FloatTensor logits, FloatArray temperature, IntArray top_k, FloatArray top_p,
         U64Array seeds, I64Array counters, std::string dtype) {
        if (logits.ndim() != 2) throw std::invalid_argument("sample: logits [R, V]");
        const int R = int(logits.shape(0)), V = int(logits.shape(1));
        check_len("temperature", temperature.shape(0), R);
        check_len("top_k", top_k.shape(0), R);
        check_len("top_p", top_p.shape(0), R);
        check_len("seeds", seeds.shape(0), R);
        check_len("counters", counters.shape(0), R);
        auto out = owned_array<int32_t>({size_t(R)});
        SamplingInputs s{temperature.data(), top_k.data(), top_p.data(), seeds.data(),
                         counters.data()};
        cuda::ops::sample(out.data(), logits.data(), s, R, V, dt(dtype));
        return out;
      },
      "logits"_a, "temperature"_a, "top_k"_a, "top_p"_a, "seeds"_a, "counters"_a, nb::kw_only(),
      "dtype"_a = "float32",
      "dtype: the logits are rounded to it first and read as the LM head leaves them (fp16/bf16: "
      "rows padded to a multiple of 8).");
  ops.def(
      "copy_blocks",
      [](FloatTensor cache, IntArray src, IntArray dst, std::string dtype) {
        if (cache.ndim() < 2) throw std::invalid_argument("copy_blocks: cache [num_blocks, ...]");
        check_len("dst", dst.shape(0), src.shape(0));
        const int num_blocks = int(cache.shape(0));
        for (size_t i = 0; i < src.shape(0); ++i) {
          if (src.data()[i] < 0 || src.data()[i] >= num_blocks || dst.data()[i] < 0 ||
              dst.data()[i] >= num_blocks) {
            throw std::invalid_argument("copy_blocks: block id out of range");
          }
        }
        auto out = copy_of(cache);
        cuda::ops::copy_blocks(out.data(), num_blocks, int64_t(cache.size() / num_blocks),
                               src.data(), dst.data(), int(src.shape(0)), dt(dtype));
        return out;
      },
      "cache"_a, "src"_a, "dst"_a, nb::kw_only(), "dtype"_a = "float32",
      "Returns a copy of cache [num_blocks, ...] with blocks dst[i] <- src[i].");
  ops.def("decode_heads_per_block", &cuda::ops::decode_heads_per_block, "num_seqs"_a,
          "num_heads"_a, "Heads per decode-attention thread block the model picks (1 or 4).");
  ops.def("uniform_from_counter", &cuda::uniform_from_counter, "seed"_a, "counter"_a);
  ops.def(
      "time_decode_attention",
      [](int num_seqs, int context_len, int num_heads, int head_size, int block_size,
         std::string dtype, int iters, int partition_size, int heads_per_block, int copies) {
        if (copies < 0) {
          throw std::invalid_argument("copies must be >= 0, got " + std::to_string(copies));
        }
        nb::gil_scoped_release release;
        return cuda::ops::time_decode_attention(num_seqs, context_len, num_heads, head_size,
                                                block_size, dt(dtype), iters, partition_size,
                                                heads_per_block, copies);
      },
      "num_seqs"_a, "context_len"_a, "num_heads"_a, "head_size"_a, "block_size"_a,
      "dtype"_a = "float16", "iters"_a = 50, "partition_size"_a = 0, "heads_per_block"_a = 0,
      "copies"_a = 0,
      "Median ms per launch of the decode-attention kernel (random data, shuffled blocks; "
      "copies 0: graph-replayed on caches not in L2, 1: one cache, each launch timed alone).");
  ops.def(
      "time_skinny_gemm",
      [](int rows, int out_features, int in_features, int chain, int iters, int warps_per_row,
         int prefetch_mb, bool l2_resident) {
        if (warps_per_row != 0 && warps_per_row != 1 && warps_per_row != 2 &&
            warps_per_row != 4 && warps_per_row != 8) {
          throw std::invalid_argument("warps_per_row must be 0 (auto), 1, 2, 4 or 8, got " +
                                      std::to_string(warps_per_row));
        }
        nb::gil_scoped_release release;
        return cuda::ops::time_skinny_gemm(rows, out_features, in_features, chain, iters,
                                           warps_per_row, prefetch_mb, l2_resident);
      },
      "rows"_a, "out_features"_a, "in_features"_a, "chain"_a = 16, "iters"_a = 20,
      "warps_per_row"_a = 0, "prefetch_mb"_a = 0, "l2_resident"_a = false,
      "Median ms per skinny GEMV (float16) in a chain of programmatic launches, weights not in "
      "L2 (unless prefetch_mb asks for the next one's, or l2_resident: every link on the same "
      "weights); warps_per_row 0: as the launcher picks.");
  ops.def(
      "time_dependency",
      [](std::string kind, int blocks_per_sm, int threads, int rounds, int iters,
         int prefetch_mb) {
        if (kind != "kernel" && kind != "barrier") {
          throw std::invalid_argument("kind must be 'kernel' or 'barrier', got '" + kind + "'");
        }
        if (blocks_per_sm < 1 || threads < 32 || threads > 1024 || threads % 32 != 0 ||
            rounds < 1 || iters < 1 || prefetch_mb < 0 || prefetch_mb > 64) {
          throw std::invalid_argument(
              "time_dependency: need blocks_per_sm >= 1, threads a multiple of 32 in [32, 1024], "
              "rounds >= 1, iters >= 1 and prefetch_mb in [0, 64]");
        }
        if (kind == "barrier" && prefetch_mb != 0) {
          throw std::invalid_argument("time_dependency: prefetch_mb is for kind 'kernel'");
        }
        nb::gil_scoped_release release;
        return cuda::ops::time_dependency(kind == "barrier", blocks_per_sm, threads, rounds,
                                          iters, prefetch_mb);
      },
      "kind"_a, "blocks_per_sm"_a, "threads"_a = 256, "rounds"_a = 256, "iters"_a = 20,
      "prefetch_mb"_a = 0,
      "Median us of one all-to-all hand-over between thread blocks: 'kernel', a boundary "
      "between programmatically launched kernels (graph-replayed); 'barrier', a grid-wide "
      "barrier inside one cooperative kernel.");
  ops.def(
      "time_handover",
      [](std::string kind, int width, int blocks_per_sm, int threads, int rounds, int iters) {
        const cuda::ops::Handover k = handover_kind(kind);
        check_handover(width, blocks_per_sm, threads, rounds);
        if (iters < 1) throw std::invalid_argument("time_handover: iters >= 1");
        nb::gil_scoped_release release;
        return cuda::ops::time_handover(k, width, blocks_per_sm, threads, rounds, iters);
      },
      "kind"_a, "width"_a = 768, "blocks_per_sm"_a = 1, "threads"_a = 256, "rounds"_a = 256,
      "iters"_a = 20,
      "Median us of one round of an all-to-all chain shaped like a batch-1 GEMV stage (every "
      "block gathers a float32 vector of `width` and writes its slice of the next): 'kernel', a "
      "programmatic kernel boundary; 'barrier', a grid barrier in one cooperative kernel; "
      "'tagged', words that carry the round that wrote them (no barrier).");
  ops.def(
      "handover_chain",
      [](std::string kind, FloatArray x0, int blocks_per_sm, int threads, int rounds) {
        const cuda::ops::Handover k = handover_kind(kind);
        const int width = int(x0.shape(0));
        check_handover(width, blocks_per_sm, threads, rounds);
        std::vector<float> y = cuda::ops::handover_chain(k, x0.data(), width, blocks_per_sm,
                                                         threads, rounds);
        auto out = owned_array<float>({size_t(width)});
        std::memcpy(out.data(), y.data(), y.size() * sizeof(float));
        return out;
      },
      "kind"_a, "x0"_a, "blocks_per_sm"_a = 1, "threads"_a = 256, "rounds"_a = 8,
      "The vector after `rounds` rounds of time_handover's chain from x0: y_j = tanh(sum_k "
      "c(j, k) x_k / sqrt(width) + x_j / 2), c(j, k) = ((31 j + 17 k) mod 13 - 6) / 4.");
  ops.def(
      "time_gemv_layers",
      [](std::string kind, int width, int layers, int iters) {
        check_gemv_layers(kind, width, layers);
        if (iters < 1) throw std::invalid_argument("time_gemv_layers: iters >= 1");
        nb::gil_scoped_release release;
        return cuda::ops::time_gemv_layers(kind == "persistent", width, layers, iters);
      },
      "kind"_a, "width"_a = 768, "layers"_a = 12, "iters"_a = 20,
      "Median us a layer of gpt2's four layer GEMVs at batch 1 (fp16), each layer its own "
      "weights: 'kernels', the engine's skinny GEMV kernels launched programmatically; "
      "'persistent', one kernel with tagged words between stages and the weights streamed "
      "through a ring in shared memory by a producer warp.");
  ops.def(
      "gemv_layers_chain",
      [](std::string kind, FloatArray x0, int layers) {
        const int width = int(x0.shape(0));
        check_gemv_layers(kind, width, layers);
        std::vector<float> y =
            cuda::ops::gemv_layers_chain(kind == "persistent", x0.data(), width, layers);
        auto out = owned_array<float>({size_t(width)});
        std::memcpy(out.data(), y.data(), y.size() * sizeof(float));
        return out;
      },
      "kind"_a, "x0"_a, "layers"_a = 1,
      "fc_proj's output of the last layer after one run of time_gemv_layers' chain from x0: "
      "weights and biases of a fixed pattern (handover_bench.cu, layer_weights_kernel), in fp16.");
  ops.def("stage_trace_built", &cuda::stage_trace_built,
          "Whether this build records the skinny GEMV's stage times (CMake PAGEDGPT2_TRACE).");
  ops.def("stage_trace_reset", &cuda::stage_trace_reset, "Forgets the stage records so far.");
  ops.def(
      "stage_trace",
      [] {
        if (!cuda::stage_trace_built()) {
          throw std::runtime_error(
              "stage_trace: this build has no stage trace (build with "
              "-C cmake.define.PAGEDGPT2_TRACE=ON)");
        }
        const std::vector<cuda::StageRecord> records = cuda::stage_trace_read();
        constexpr size_t kColumns = 5 + 2 * cuda::kStages;
        auto out = owned_array<uint64_t>({records.size(), kColumns});
        uint64_t* row = out.data();
        for (const cuda::StageRecord& r : records) {
          const uint64_t head[5] = {r.N, r.K, r.rows, r.block, r.sm};
          std::memcpy(row, head, sizeof(head));
          std::memcpy(row + 5, r.global_ns, sizeof(r.global_ns));
          std::memcpy(row + 5 + cuda::kStages, r.clocks, sizeof(r.clocks));
          row += kColumns;
        }
        return out;
      },
      "The skinny GEMV's stage records since the last reset, uint64 [n, 15]: N, K, rows, block, "
      "SM, %globaltimer ns at start / pdl_wait passed / x staged / first products / end, then "
      "clock64 at the same five stages.");
  ops.def(
      "copy_bandwidth_gbs",
      [](int64_t bytes, int iters) {
        nb::gil_scoped_release release;
        return cuda::ops::copy_bandwidth_gbs(bytes, iters);
      },
      "bytes"_a = int64_t(1) << 30, "iters"_a = 20,
      "Device-to-device copy bandwidth, GB/s counting bytes read + written.");
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "pagedgpt2 CUDA backend: CudaModel and the CUDA kernels as test ops";
  m.def("device_count", &cuda::device_count, "Number of visible CUDA devices (0 without a GPU).");
  bind_ops(m);

  auto cls = nb::class_<cuda::CudaModel>(
      m, "CudaModel", "GPT-2 on one CUDA GPU over a paged KV cache (float32/float16/bfloat16).");
  cls.def(
      "__init__",
      [](cuda::CudaModel* self, nb::dict config, nb::dict weights, std::string dtype,
         int num_blocks, int block_size, double gpu_memory_fraction, int device_index,
         int max_num_seqs, int max_num_batched_tokens) {
        ModelConfig cfg = bindings::config_from_dict(config);
        HostWeights w = bindings::weights_from_dict(weights);
        new (self) cuda::CudaModel(cfg, w, dtype, num_blocks, block_size, gpu_memory_fraction,
                                   device_index, max_num_seqs, max_num_batched_tokens);
      },
      "config"_a, "weights"_a, "dtype"_a = "float16", "num_blocks"_a = -1, "block_size"_a = 16,
      "gpu_memory_fraction"_a = 0.9, "device_index"_a = 0, "max_num_seqs"_a = 256,
      "max_num_batched_tokens"_a = 2048,
      "num_blocks=-1 sizes the KV pool from free GPU memory x gpu_memory_fraction.");
  bindings::bind_model_methods(cls);
  cls.def_prop_ro("dtype", &cuda::CudaModel::dtype);
  cls.def_prop_rw("use_cuda_graphs", &cuda::CudaModel::use_cuda_graphs,
                  &cuda::CudaModel::set_use_cuda_graphs,
                  "Replay decode steps from CUDA graphs (default True).");
  cls.def_prop_ro("num_cuda_graphs", &cuda::CudaModel::num_cuda_graphs);
}

// Binds any backend that implements pagedgpt2::Model with one Python surface, so that the CPU
// (_core) and CUDA (_cuda) modules look the same to the generation loop. Shapes are checked here,
// once, at the boundary; the backends trust them.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstring>
#include <map>
#include <vector>
#include <stdexcept>
#include <string>

#include "engine/model.h"

namespace pagedgpt2::bindings {

namespace nb = nanobind;
using namespace nb::literals;

using IntArray = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using IntMatrix = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using FloatArray = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U64Array = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I64Array = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

using FloatTensor = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;

// A numpy array of the given shape that owns fresh (uninitialized) memory.
template <class T>
nb::ndarray<nb::numpy, T> owned_array(std::vector<size_t> shape) {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  T* data = new T[n > 0 ? n : 1];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

// A float32 numpy copy of a.
inline nb::ndarray<nb::numpy, float> copy_of(const FloatTensor& a) {
  std::vector<size_t> shape(a.shape_ptr(), a.shape_ptr() + a.ndim());
  auto out = owned_array<float>(shape);
  std::memcpy(out.data(), a.data(), a.size() * sizeof(float));
  return out;
}

inline void check_len(const char* name, size_t got, size_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(want) +
                                " entries, got " + std::to_string(got));
  }
}

// Builds StepInputs over the arrays (which must outlive the call) and checks their shapes.
// slot_mapping: num_slots entries at slots.
inline StepInputs make_step_inputs(IntArray token_ids, IntArray positions, const int32_t* slots,
                                   size_t num_slots, IntArray query_start_loc,
                                   IntArray context_lens, IntMatrix block_tables,
                                   IntArray logits_indices) {
  StepInputs in;
  in.num_tokens = static_cast<int>(token_ids.shape(0));
  in.num_seqs = static_cast<int>(context_lens.shape(0));
  in.max_blocks_per_seq = static_cast<int>(block_tables.shape(1));
  in.num_logits = static_cast<int>(logits_indices.shape(0));
  check_len("positions", positions.shape(0), in.num_tokens);
  check_len("slot_mapping", num_slots, in.num_tokens);
  check_len("query_start_loc", query_start_loc.shape(0), in.num_seqs + 1);
  check_len("block_tables rows", block_tables.shape(0), in.num_seqs);
  in.token_ids = token_ids.data();
  in.positions = positions.data();
  in.slot_mapping = slots;
  in.query_start_loc = query_start_loc.data();
  in.context_lens = context_lens.data();
  in.block_tables = block_tables.data();
  in.logits_indices = logits_indices.data();
  return in;
}

inline StepInputs make_step_inputs(IntArray token_ids, IntArray positions, IntArray slot_mapping,
                                   IntArray query_start_loc, IntArray context_lens,
                                   IntMatrix block_tables, IntArray logits_indices) {
  return make_step_inputs(token_ids, positions, slot_mapping.data(), slot_mapping.shape(0),
                          query_start_loc, context_lens, block_tables, logits_indices);
}

// SamplingInputs over per-row arrays of num_rows entries each (checked).
inline SamplingInputs make_sampling_inputs(int num_rows, FloatArray temperature, IntArray top_k,
                                           FloatArray top_p, U64Array seeds,
                                           I64Array counters) {
  check_len("temperature", temperature.shape(0), num_rows);
  check_len("top_k", top_k.shape(0), num_rows);
  check_len("top_p", top_p.shape(0), num_rows);
  check_len("seeds", seeds.shape(0), num_rows);
  check_len("counters", counters.shape(0), num_rows);
  SamplingInputs s;
  s.temperature = temperature.data();
  s.top_k = top_k.data();
  s.top_p = top_p.data();
  s.seeds = seeds.data();
  s.counters = counters.data();
  return s;
}

// The step-0 inputs of a decode run of k = slot_mappings.shape(0) steps, checked: one token and
// one logits row per sequence, in order, and room for k more tokens in every sequence.
inline StepInputs decode_run_inputs(const Model& m, const std::string& what, IntArray token_ids,
                                    IntArray positions, IntMatrix slot_mappings,
                                    IntArray query_start_loc, IntArray context_lens,
                                    IntMatrix block_tables, IntArray logits_indices) {
  const size_t k = slot_mappings.shape(0);
  if (k < 1) throw std::invalid_argument(what + ": slot_mappings has no step");
  StepInputs in = make_step_inputs(token_ids, positions, slot_mappings.data(),
                                   slot_mappings.shape(1), query_start_loc, context_lens,
                                   block_tables, logits_indices);
  check_len("token_ids (one per sequence)", in.num_tokens, in.num_seqs);
  check_len("logits_indices (one per sequence)", in.num_logits, in.num_seqs);
  for (int q = 0; q < in.num_seqs; ++q) {
    if (query_start_loc.data()[q] != q || logits_indices.data()[q] != q) {
      throw std::invalid_argument(
          what + ": a decode batch has one token and one logits row per sequence, in order");
    }
  }
  const int n_positions = m.config().n_positions;
  const int64_t table_tokens = int64_t(in.max_blocks_per_seq) * m.block_size();
  for (int q = 0; q < in.num_seqs; ++q) {
    if (positions.data()[q] + int64_t(k) > n_positions ||
        context_lens.data()[q] - 1 + int64_t(k) > table_tokens) {
      throw std::invalid_argument(
          what + ": sequence " + std::to_string(q) + " at position " +
          std::to_string(positions.data()[q]) + " cannot take " + std::to_string(k) +
          " more tokens (n_positions " + std::to_string(n_positions) + ", block table of " +
          std::to_string(table_tokens) + " slots)");
    }
  }
  return in;
}

// dict[str, numpy float32 C-contiguous array] -> HostWeights (views: keep the dict alive).
inline HostWeights weights_from_dict(const nb::dict& tensors) {
  using Any = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
  HostWeights out;
  for (auto [key, value] : tensors) {
    Any array = nb::cast<Any>(value);
    HostTensor t;
    t.data = array.data();
    for (size_t i = 0; i < array.ndim(); ++i) t.shape.push_back(array.shape(i));
    out[nb::cast<std::string>(key)] = t;
  }
  return out;
}

inline ModelConfig config_from_dict(const nb::dict& c) {
  ModelConfig cfg;
  cfg.vocab_size = nb::cast<int>(c["vocab_size"]);
  cfg.n_positions = nb::cast<int>(c["n_positions"]);
  cfg.n_embd = nb::cast<int>(c["n_embd"]);
  cfg.n_layer = nb::cast<int>(c["n_layer"]);
  cfg.n_head = nb::cast<int>(c["n_head"]);
  cfg.n_inner = nb::cast<int>(c["n_inner"]);
  cfg.layer_norm_epsilon = nb::cast<float>(c["layer_norm_epsilon"]);
  return cfg;
}

template <class M>
void bind_model_methods(nb::class_<M>& cls) {
  cls.def(
      "forward",
      [](M& m, IntArray token_ids, IntArray positions, IntArray slot_mapping,
         IntArray query_start_loc, IntArray context_lens, IntMatrix block_tables,
         IntArray logits_indices) {
        StepInputs in = make_step_inputs(token_ids, positions, slot_mapping, query_start_loc,
                                         context_lens, block_tables, logits_indices);
        auto logits = owned_array<float>(
            {static_cast<size_t>(in.num_logits), static_cast<size_t>(m.config().vocab_size)});
        {
          nb::gil_scoped_release release;
          m.forward(in, logits.data());
        }
        return logits;
      },
      "token_ids"_a, "positions"_a, "slot_mapping"_a, "query_start_loc"_a, "context_lens"_a,
      "block_tables"_a, "logits_indices"_a,
      "One forward over a ragged batch; returns float32 logits [num_logits, vocab].");
  cls.def(
      "forward_and_sample",
      [](M& m, IntArray token_ids, IntArray positions, IntArray slot_mapping,
         IntArray query_start_loc, IntArray context_lens, IntMatrix block_tables,
         IntArray logits_indices, FloatArray temperature, IntArray top_k, FloatArray top_p,
         U64Array seeds, I64Array counters) {
        StepInputs in = make_step_inputs(token_ids, positions, slot_mapping, query_start_loc,
                                         context_lens, block_tables, logits_indices);
        const SamplingInputs s =
            make_sampling_inputs(in.num_logits, temperature, top_k, top_p, seeds, counters);
        auto next = owned_array<int32_t>({static_cast<size_t>(in.num_logits)});
        {
          nb::gil_scoped_release release;
          m.forward_and_sample(in, s, next.data());
        }
        return next;
      },
      "token_ids"_a, "positions"_a, "slot_mapping"_a, "query_start_loc"_a, "context_lens"_a,
      "block_tables"_a, "logits_indices"_a, "temperature"_a, "top_k"_a, "top_p"_a, "seeds"_a,
      "counters"_a, "Forward, then one sampled token id per logits row (int32 [num_logits]).");
  cls.def(
      "decode_steps",
      [](M& m, IntArray token_ids, IntArray positions, IntMatrix slot_mappings,
         IntArray query_start_loc, IntArray context_lens, IntMatrix block_tables,
         IntArray logits_indices, FloatArray temperature, IntArray top_k, FloatArray top_p,
         U64Array seeds, I64Array counters) {
        const StepInputs in =
            decode_run_inputs(m, "decode_steps", token_ids, positions, slot_mappings,
                              query_start_loc, context_lens, block_tables, logits_indices);
        const SamplingInputs s =
            make_sampling_inputs(in.num_logits, temperature, top_k, top_p, seeds, counters);
        const size_t k = slot_mappings.shape(0);
        auto next = owned_array<int32_t>({k, static_cast<size_t>(in.num_seqs)});
        {
          nb::gil_scoped_release release;
          m.decode_steps(in, s, static_cast<int>(k), slot_mappings.data(), next.data());
        }
        return next;
      },
      "token_ids"_a, "positions"_a, "slot_mappings"_a, "query_start_loc"_a, "context_lens"_a,
      "block_tables"_a, "logits_indices"_a, "temperature"_a, "top_k"_a, "top_p"_a, "seeds"_a,
      "counters"_a,
      "k decode steps in one call (k = rows of slot_mappings [k, S]): step i feeds step i-1's "
      "tokens at positions + i, context_lens + i, counters + i. Returns int32 [k, S].");
  cls.def(
      "launch_decode_steps",
      [](M& m, IntArray token_ids, IntArray positions, IntMatrix slot_mappings,
         IntArray query_start_loc, IntArray context_lens, IntMatrix block_tables,
         IntArray logits_indices, FloatArray temperature, IntArray top_k, FloatArray top_p,
         U64Array seeds, I64Array counters, bool continue_run) {
        const StepInputs in =
            decode_run_inputs(m, "launch_decode_steps", token_ids, positions, slot_mappings,
                              query_start_loc, context_lens, block_tables, logits_indices);
        const SamplingInputs s =
            make_sampling_inputs(in.num_logits, temperature, top_k, top_p, seeds, counters);
        nb::gil_scoped_release release;
        m.launch_decode_steps(in, s, static_cast<int>(slot_mappings.shape(0)),
                              slot_mappings.data(), continue_run);
      },
      "token_ids"_a, "positions"_a, "slot_mappings"_a, "query_start_loc"_a, "context_lens"_a,
      "block_tables"_a, "logits_indices"_a, "temperature"_a, "top_k"_a, "top_p"_a, "seeds"_a,
      "counters"_a, "continue_run"_a = false,
      "Starts decode_steps' work and returns (the CUDA backend does not wait for it); "
      "collect_decode_steps() returns its tokens. With continue_run=True step 0 feeds the last "
      "tokens the previous launched run sampled, which the caller need not have seen "
      "(token_ids is not read). At most one run may be uncollected when another starts.");
  cls.def(
      "collect_decode_steps",
      [](M& m) {
        const auto [k, S] = m.oldest_run_shape();
        auto next = owned_array<int32_t>({static_cast<size_t>(k), static_cast<size_t>(S)});
        {
          nb::gil_scoped_release release;
          m.collect_decode_steps(next.data());
        }
        return next;
      },
      "Waits for the oldest launched decode run; its tokens, int32 [k, S].");
  cls.def_prop_ro("runs_in_flight", &M::runs_in_flight,
                  "Decode runs launched and not yet collected.");
  cls.def(
      "copy_blocks",
      [](M& m, IntArray src, IntArray dst) {
        check_len("dst", dst.shape(0), src.shape(0));
        nb::gil_scoped_release release;
        m.copy_blocks(src.data(), dst.data(), static_cast<int>(src.shape(0)));
      },
      "src"_a, "dst"_a, "Copies whole KV blocks of every layer: dst[i] <- src[i].");
  cls.def_prop_ro("num_blocks", &M::num_blocks);
  cls.def_prop_ro("block_size", &M::block_size);
  cls.def_prop_ro("kv_bytes_per_block", &M::kv_bytes_per_block);
  cls.def_prop_ro("device_name", &M::device_name);
}

}  // namespace pagedgpt2::bindings

// pagedgpt2._core: the block allocator, block tables, the CPU backend and the CPU reference ops.
// Exports only; the logic lives in cpp/allocator and cpp/cpu.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <optional>

#include "allocator/block_manager.h"
#include "bindings/model_binding.h"
#include "cpu/cpu_model.h"
#include "cpu/ops.h"

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

// Grows each sequence by its new tokens and lays out the arrays one step needs.
// Returns (slot_mapping [T], block_tables [S, max_blocks], context_lens [S], copies [n, 2]).
nb::tuple prepare_step(BlockManager& bm, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig,
                                                     nb::device::cpu> seq_ids,
                       IntArray num_new_tokens, IntArray token_ids, int max_blocks) {
  const size_t S = seq_ids.shape(0);
  check_len("num_new_tokens", num_new_tokens.shape(0), S);
  size_t num_tokens = 0;
  for (size_t s = 0; s < S; ++s) num_tokens += num_new_tokens.data()[s];
  check_len("token_ids", token_ids.shape(0), num_tokens);
  std::vector<int32_t> slots;
  std::vector<BlockCopy> copies;
  auto tables = owned_array<int32_t>({S, size_t(max_blocks)});
  auto context_lens = owned_array<int32_t>({S});
  std::fill(tables.data(), tables.data() + S * max_blocks, 0);
  const int32_t* tokens = token_ids.data();
  for (size_t s = 0; s < S; ++s) {
    auto c = bm.append_slots(seq_ids.data()[s], tokens, num_new_tokens.data()[s], &slots);
    tokens += num_new_tokens.data()[s];
    copies.insert(copies.end(), c.begin(), c.end());
    const std::vector<int>& table = bm.block_table(seq_ids.data()[s]);
    if (int(table.size()) > max_blocks) {
      throw std::invalid_argument("max_blocks " + std::to_string(max_blocks) + " < " +
                                  std::to_string(table.size()) + " blocks of a sequence");
    }
    std::copy(table.begin(), table.end(), tables.data() + s * max_blocks);
    context_lens.data()[s] = bm.num_tokens(seq_ids.data()[s]);
  }
  auto slot_mapping = owned_array<int32_t>({slots.size()});
  std::copy(slots.begin(), slots.end(), slot_mapping.data());
  auto copy_pairs = owned_array<int32_t>({copies.size(), 2});
  for (size_t i = 0; i < copies.size(); ++i) {
    copy_pairs.data()[2 * i] = copies[i].src;
    copy_pairs.data()[2 * i + 1] = copies[i].dst;
  }
  return nb::make_tuple(slot_mapping, tables, context_lens, copy_pairs);
}

void bind_allocator(nb::module_& m) {
  nb::class_<BlockAllocator>(m, "BlockAllocator",
                             "Free list and reference counts of a pool of KV blocks.")
      .def(nb::init<int>(), "num_blocks"_a)
      .def("allocate", &BlockAllocator::allocate)
      .def("share", &BlockAllocator::share, "block_id"_a)
      .def("release", &BlockAllocator::release, "block_id"_a)
      .def("ref_count", &BlockAllocator::ref_count, "block_id"_a)
      .def_prop_ro("num_blocks", &BlockAllocator::num_blocks)
      .def_prop_ro("num_free", &BlockAllocator::num_free)
      .def_prop_ro("num_used", &BlockAllocator::num_used);

  nb::class_<BlockManager>(m, "BlockManager", "Block tables of sequences over one block pool.")
      .def(nb::init<int, int, bool>(), "num_blocks"_a, "block_size"_a,
           "enable_prefix_caching"_a = false)
      .def_prop_ro("prefix_caching", &BlockManager::prefix_caching)
      .def_prop_ro("num_cached_blocks", &BlockManager::num_cached_blocks)
      .def_prop_ro("num_evictable", [](const BlockManager& b) { return b.allocator().num_evictable(); })
      .def_prop_ro("num_prefix_queried_blocks", &BlockManager::num_prefix_queried_blocks)
      .def_prop_ro("num_prefix_hit_blocks", &BlockManager::num_prefix_hit_blocks)
      .def_prop_ro("block_size", &BlockManager::block_size)
      .def_prop_ro("num_blocks", [](const BlockManager& b) { return b.allocator().num_blocks(); })
      .def_prop_ro("num_free", [](const BlockManager& b) { return b.allocator().num_free(); })
      .def_prop_ro("num_used", [](const BlockManager& b) { return b.allocator().num_used(); })
      .def_prop_ro("num_sequences", &BlockManager::num_sequences)
      .def_prop_ro("num_slots_in_use", &BlockManager::num_slots_in_use)
      .def_prop_ro("num_tokens_held", &BlockManager::num_tokens_held)
      .def_prop_ro("num_shared_blocks", &BlockManager::num_shared_blocks)
      .def_prop_ro("num_logical_blocks", &BlockManager::num_logical_blocks)
      .def("ref_count", [](const BlockManager& b, int id) { return b.allocator().ref_count(id); })
      .def("blocks_for", &BlockManager::blocks_for, "num_tokens"_a)
      .def("can_allocate", &BlockManager::can_allocate, "num_tokens"_a)
      .def("add_sequence", &BlockManager::add_sequence, "seq_id"_a)
      .def(
          "append_slots",
          [](BlockManager& b, int64_t seq_id, const std::vector<int32_t>& token_ids) {
            std::vector<int32_t> slots;
            std::vector<std::pair<int, int>> copies;
            for (const BlockCopy& c : b.append_slots(seq_id, token_ids.data(), int(token_ids.size()), &slots)) {
              copies.push_back({c.src, c.dst});
            }
            return std::make_pair(slots, copies);
          },
          "seq_id"_a, "token_ids"_a,
          "Room for these next tokens: (their cache slots, [(src, dst)] block copies to make first).")
      .def(
          "match_prefix",
          [](BlockManager& b, int64_t seq_id, const std::vector<int32_t>& token_ids) {
            return b.match_prefix(seq_id, token_ids.data(), int(token_ids.size()));
          },
          "seq_id"_a, "token_ids"_a,
          "Prefix caching: share the cached blocks of the prompt's longest whole-block prefix; "
          "returns the tokens now held.")
      .def("blocks_needed_to_append", &BlockManager::blocks_needed_to_append, "seq_id"_a,
           "num_new_tokens"_a)
      .def(
          "blocks_needed_to_append_each",
          [](const BlockManager& b,
             nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> seq_ids,
             int num_new_tokens) {
            int64_t total = 0;
            for (size_t i = 0; i < seq_ids.shape(0); ++i) {
              total += b.blocks_needed_to_append(seq_ids.data()[i], num_new_tokens);
            }
            return total;
          },
          "seq_ids"_a, "num_new_tokens"_a,
          "Blocks that appending num_new_tokens to each of these sequences takes, in all.")
      .def("fork", &BlockManager::fork, "parent_id"_a, "child_id"_a)
      .def("free_sequence", &BlockManager::free_sequence, "seq_id"_a)
      .def("has_sequence", &BlockManager::has_sequence, "seq_id"_a)
      .def("block_table", &BlockManager::block_table, "seq_id"_a)
      .def("num_tokens", &BlockManager::num_tokens, "seq_id"_a)
      .def("prepare_step", &prepare_step, "seq_ids"_a, "num_new_tokens"_a, "token_ids"_a,
           "max_blocks"_a);
}

void bind_ops(nb::module_& m) {
  nb::module_ ops = m.def_submodule("ops", "CPU reference ops (float32 numpy in and out).");
  ops.def("layernorm", [](FloatTensor in, FloatTensor w, FloatTensor b, float eps) {
    const int C = int(in.shape(in.ndim() - 1)), T = int(in.size() / C);
    auto out = copy_of(in);
    cpu::layernorm(out.data(), in.data(), w.data(), b.data(), T, C, eps);
    return out;
  });
  ops.def("matmul", [](FloatTensor in, FloatTensor w, std::optional<FloatTensor> bias) {
    const int K = int(in.shape(1)), T = int(in.shape(0)), N = int(w.shape(0));
    check_len("weight columns", w.shape(1), K);
    auto out = owned_array<float>({size_t(T), size_t(N)});
    cpu::matmul(out.data(), in.data(), w.data(), bias ? bias->data() : nullptr, T, N, K);
    return out;
  }, "input"_a, "weight"_a, "bias"_a.none());
  ops.def("gelu", [](FloatTensor x) {
    auto out = copy_of(x);
    cpu::gelu(out.data(), int64_t(x.size()));
    return out;
  });
  ops.def("write_kv", [](FloatTensor k_cache, FloatTensor v_cache, FloatTensor qkv,
                         IntArray slot_mapping, int num_heads) {
    auto k = copy_of(k_cache), v = copy_of(v_cache);
    const int T = int(qkv.shape(0)), D = int(qkv.shape(1)) / 3 / num_heads;
    cpu::write_kv(k.data(), v.data(), qkv.data(), slot_mapping.data(), T, num_heads, D);
    return nb::make_tuple(k, v);
  });
  ops.def("paged_attention", [](FloatTensor qkv, FloatTensor k_cache, FloatTensor v_cache,
                                IntArray positions, IntArray query_start_loc,
                                IntMatrix block_tables, int num_heads) {
    const int T = int(qkv.shape(0)), C = int(qkv.shape(1)) / 3, D = C / num_heads;
    const int S = int(query_start_loc.shape(0)) - 1;
    auto out = owned_array<float>({size_t(T), size_t(C)});
    cpu::paged_attention(out.data(), qkv.data(), k_cache.data(), v_cache.data(),
                         positions.data(), query_start_loc.data(), block_tables.data(), S,
                         int(block_tables.shape(1)), num_heads, D, int(k_cache.shape(1)));
    return out;
  });
  ops.def("sample", [](FloatTensor logits, FloatArray temperature, IntArray top_k,
                       FloatArray top_p, U64Array seeds, I64Array counters) {
    const int R = int(logits.shape(0)), V = int(logits.shape(1));
    auto scratch = copy_of(logits);
    auto out = owned_array<int32_t>({size_t(R)});
    SamplingInputs s{temperature.data(), top_k.data(), top_p.data(), seeds.data(), counters.data()};
    cpu::sample(out.data(), scratch.data(), s, R, V);
    return out;
  });
  ops.def("uniform_from_counter", &cpu::uniform_from_counter, "seed"_a, "counter"_a);
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "pagedgpt2 core: block allocator, block tables, CPU backend, CPU reference ops";
  bind_allocator(m);
  bind_ops(m);

  auto cls = nb::class_<cpu::CpuModel>(m, "CpuModel", "GPT-2 on the CPU over a paged KV cache.");
  cls.def(
      "__init__",
      [](cpu::CpuModel* self, nb::dict config, nb::dict weights, int num_blocks, int block_size,
         int num_threads) {
        ModelConfig cfg = bindings::config_from_dict(config);
        HostWeights w = bindings::weights_from_dict(weights);
        new (self) cpu::CpuModel(cfg, w, num_blocks, block_size, num_threads);
      },
      "config"_a, "weights"_a, "num_blocks"_a, "block_size"_a, "num_threads"_a = 0);
  bindings::bind_model_methods(cls);
}

#include "allocator/block_manager.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pagedgpt2 {
namespace {

constexpr uint64_t kRootHash = 0x6a09e667f3bcc908ULL;  // the parent of every first block

inline uint64_t mix(uint64_t z) {  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

BlockManager::BlockManager(int num_blocks, int block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching), allocator_(num_blocks) {
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1");
  if (prefix_caching_) {
    hash_of_block_.assign(num_blocks, 0);
    parent_of_block_.assign(num_blocks, 0);
    tokens_of_block_.assign(size_t(num_blocks) * block_size, 0);
    allocator_.set_eviction_callback([this](int block_id) { forget(block_id); });
  }
}

BlockManager::Sequence& BlockManager::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + std::to_string(seq_id));
  return it->second;
}

const BlockManager::Sequence& BlockManager::get(int64_t seq_id) const {
  return const_cast<BlockManager*>(this)->get(seq_id);
}

void BlockManager::add_sequence(int64_t seq_id) {
  if (!seqs_.emplace(seq_id, Sequence{}).second) {
    throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already exists");
  }
}

// ---------------------------------------------------------------------------------------------
// Prefix cache
// ---------------------------------------------------------------------------------------------

uint64_t BlockManager::hash_block(uint64_t parent, const int32_t* tokens) const {
  uint64_t h = mix(parent);
  for (int i = 0; i < block_size_; ++i) h = mix(h ^ (uint64_t(uint32_t(tokens[i])) + 0x9E3779B97F4A7C15ULL));
  return h;
}

uint64_t BlockManager::parent_hash(const Sequence& seq, int block_index) const {
  return block_index == 0 ? kRootHash : hash_of_block_[seq.block_table[block_index - 1]];
}

bool BlockManager::holds(int block_id, uint64_t parent, const int32_t* tokens) const {
  return parent_of_block_[block_id] == parent &&
         std::equal(tokens, tokens + block_size_, tokens_of_block_.begin() + size_t(block_id) * block_size_);
}

int BlockManager::match_prefix(int64_t seq_id, const int32_t* tokens, int num_tokens) {
  Sequence& seq = get(seq_id);
  if (!prefix_caching_ || seq.num_tokens != 0) return 0;
  const int max_blocks = (num_tokens - 1) / block_size_;  // leave >= 1 token to compute
  uint64_t parent = kRootHash;
  num_queried_blocks_ += max_blocks;
  for (int i = 0; i < max_blocks; ++i) {
    const int32_t* block_tokens = tokens + size_t(i) * block_size_;
    const uint64_t h = hash_block(parent, block_tokens);
    auto it = block_of_hash_.find(h);
    if (it == block_of_hash_.end() || !holds(it->second, parent, block_tokens)) break;
    allocator_.share(it->second);
    seq.block_table.push_back(it->second);
    parent = h;
    ++num_hit_blocks_;
  }
  seq.num_tokens = int(seq.block_table.size()) * block_size_;
  seq.tokens.assign(tokens, tokens + seq.num_tokens);
  return seq.num_tokens;
}

// Registers the blocks that became full with tokens [first_new_token, seq.num_tokens).
void BlockManager::register_full_blocks(Sequence& seq, int first_new_token) {
  for (int b = first_new_token / block_size_; b < seq.num_tokens / block_size_; ++b) {
    const int block_id = seq.block_table[b];
    if (allocator_.is_cached(block_id)) continue;  // already registered (a shared prefix)
    const uint64_t parent = parent_hash(seq, b);
    const int32_t* tokens = seq.tokens.data() + size_t(b) * block_size_;
    const uint64_t h = hash_block(parent, tokens);
    if (!block_of_hash_.emplace(h, block_id).second) {
      // The same prefix already lives in another block: keep that one as the cached copy. This
      // block's children must still find their parent hash, so record it without registering.
      hash_of_block_[block_id] = h;
      continue;
    }
    hash_of_block_[block_id] = h;
    parent_of_block_[block_id] = parent;
    std::copy(tokens, tokens + block_size_, tokens_of_block_.begin() + size_t(block_id) * block_size_);
    allocator_.set_cached(block_id, true);
  }
}

void BlockManager::forget(int block_id) {
  auto it = block_of_hash_.find(hash_of_block_[block_id]);
  if (it != block_of_hash_.end() && it->second == block_id) block_of_hash_.erase(it);
}

// ---------------------------------------------------------------------------------------------
// Growing, forking, freeing
// ---------------------------------------------------------------------------------------------

bool BlockManager::last_block_shared(const Sequence& seq) const {
  return !seq.block_table.empty() && seq.num_tokens % block_size_ != 0 &&
         allocator_.ref_count(seq.block_table.back()) > 1;
}

int BlockManager::blocks_needed_to_append(int64_t seq_id, int num_new_tokens) const {
  const Sequence& seq = get(seq_id);
  int copies = (num_new_tokens > 0 && last_block_shared(seq)) ? 1 : 0;
  return blocks_for(seq.num_tokens + num_new_tokens) - int(seq.block_table.size()) + copies;
}

std::vector<BlockCopy> BlockManager::append_slots(int64_t seq_id, const int32_t* tokens,
                                                  int num_new_tokens, std::vector<int32_t>* slots) {
  if (num_new_tokens < 0) throw std::invalid_argument("num_new_tokens must be >= 0");
  Sequence& seq = get(seq_id);
  int needed = blocks_needed_to_append(seq_id, num_new_tokens);
  if (needed > allocator_.num_free()) {
    throw std::runtime_error("KV block pool exhausted: sequence " + std::to_string(seq_id) +
                             " needs " + std::to_string(needed) + " more blocks, " +
                             std::to_string(allocator_.num_free()) + " free");
  }
  std::vector<BlockCopy> copies;
  if (num_new_tokens > 0 && last_block_shared(seq)) {
    int shared = seq.block_table.back();
    int own = allocator_.allocate();
    allocator_.release(shared);
    seq.block_table.back() = own;
    copies.push_back({shared, own});
  }
  while (int(seq.block_table.size()) < blocks_for(seq.num_tokens + num_new_tokens)) {
    seq.block_table.push_back(allocator_.allocate());
  }
  const int first = seq.num_tokens;
  for (int p = first; p < first + num_new_tokens; ++p) {
    slots->push_back(seq.block_table[p / block_size_] * block_size_ + p % block_size_);
  }
  seq.num_tokens += num_new_tokens;
  if (prefix_caching_) {
    seq.tokens.insert(seq.tokens.end(), tokens, tokens + num_new_tokens);
    register_full_blocks(seq, first);
  }
  return copies;
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Sequence parent = get(parent_id);  // copy: emplace may rehash
  add_sequence(child_id);
  for (int block : parent.block_table) allocator_.share(block);
  seqs_[child_id] = parent;
}

void BlockManager::free_sequence(int64_t seq_id) {
  Sequence& seq = get(seq_id);
  // Release the last block first so that, among evictable blocks, a prefix's deeper blocks go
  // before its shallower ones (they are worth less: fewer prompts reach them).
  for (auto it = seq.block_table.rbegin(); it != seq.block_table.rend(); ++it) allocator_.release(*it);
  seqs_.erase(seq_id);
}

const std::vector<int>& BlockManager::block_table(int64_t seq_id) const {
  return get(seq_id).block_table;
}

int BlockManager::num_tokens(int64_t seq_id) const { return get(seq_id).num_tokens; }

int64_t BlockManager::num_tokens_held() const {
  // A block shared by several sequences holds its tokens once: count each block's fill once.
  std::unordered_map<int, int> fill;  // block id -> tokens in it
  for (const auto& [id, seq] : seqs_) {
    for (size_t i = 0; i < seq.block_table.size(); ++i) {
      int in_block = std::min(block_size_, seq.num_tokens - int(i) * block_size_);
      int& f = fill[seq.block_table[i]];
      f = std::max(f, in_block);
    }
  }
  int64_t total = 0;
  for (const auto& [block, f] : fill) total += f;
  return total;
}

int64_t BlockManager::num_logical_blocks() const {
  int64_t n = 0;
  for (const auto& [id, seq] : seqs_) n += int64_t(seq.block_table.size());
  return n;
}

int BlockManager::num_shared_blocks() const {
  int n = 0;
  for (int id = 0; id < allocator_.num_blocks(); ++id) n += allocator_.ref_count(id) > 1;
  return n;
}

}  // namespace pagedgpt2

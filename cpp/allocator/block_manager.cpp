#include "allocator/block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pagedgpt2 {

BlockManager::BlockManager(int num_blocks, int block_size)
    : block_size_(block_size), allocator_(num_blocks) {
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1");
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

bool BlockManager::last_block_shared(const Sequence& seq) const {
  return !seq.block_table.empty() && seq.num_tokens % block_size_ != 0 &&
         allocator_.ref_count(seq.block_table.back()) > 1;
}

int BlockManager::blocks_needed_to_append(int64_t seq_id, int num_new_tokens) const {
  const Sequence& seq = get(seq_id);
  int copies = (num_new_tokens > 0 && last_block_shared(seq)) ? 1 : 0;
  return blocks_for(seq.num_tokens + num_new_tokens) - int(seq.block_table.size()) + copies;
}

std::vector<BlockCopy> BlockManager::append_slots(int64_t seq_id, int num_new_tokens,
                                                  std::vector<int32_t>* slots) {
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
  for (int p = seq.num_tokens; p < seq.num_tokens + num_new_tokens; ++p) {
    slots->push_back(seq.block_table[p / block_size_] * block_size_ + p % block_size_);
  }
  seq.num_tokens += num_new_tokens;
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
  for (int block : seq.block_table) allocator_.release(block);
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

int BlockManager::num_shared_blocks() const {
  int n = 0;
  for (int id = 0; id < allocator_.num_blocks(); ++id) n += allocator_.ref_count(id) > 1;
  return n;
}

}  // namespace pagedgpt2

// Block tables: which blocks hold each sequence's keys and values.
//
// A sequence grows one slot at a time; when its last block is full it gets a new one from the
// allocator. Forked sequences share every block by reference count; the first write into a
// shared, partly filled last block copies it (copy-on-write), and the caller is told which
// copies the backend must make before the step runs.
//
// The contiguous mode ("standard caching") is the same class with block_size = max_seq_len and
// each sequence given its one block up front: the same interface, different memory.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "allocator/block_allocator.h"

namespace pagedgpt2 {

struct BlockCopy {
  int src;
  int dst;
};

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size);

  int block_size() const { return block_size_; }
  const BlockAllocator& allocator() const { return allocator_; }

  // Blocks a sequence needs to hold num_tokens tokens.
  int blocks_for(int num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }
  bool can_allocate(int num_tokens) const { return blocks_for(num_tokens) <= allocator_.num_free(); }

  // A new, empty sequence. Throws if seq_id exists.
  void add_sequence(int64_t seq_id);
  // Makes room for num_new_tokens more tokens at the end of the sequence and appends their cache
  // slots to *slots. Returns the block copies the backend must make first (copy-on-write).
  // Throws std::runtime_error, changing nothing, when the pool cannot supply the blocks.
  std::vector<BlockCopy> append_slots(int64_t seq_id, int num_new_tokens,
                                      std::vector<int32_t>* slots);
  // Blocks append_slots(seq_id, n) would take from the pool.
  int blocks_needed_to_append(int64_t seq_id, int num_new_tokens) const;
  // child starts as a copy of parent that shares all its blocks.
  void fork(int64_t parent_id, int64_t child_id);
  // Returns the sequence's blocks to the pool (those still shared stay with their other owners).
  void free_sequence(int64_t seq_id);

  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int>& block_table(int64_t seq_id) const;
  int num_tokens(int64_t seq_id) const;
  int num_sequences() const { return static_cast<int>(seqs_.size()); }
  // Token slots reserved by blocks in use, and tokens they hold (a shared block counts once).
  int64_t num_slots_in_use() const { return int64_t(allocator_.num_used()) * block_size_; }
  int64_t num_tokens_held() const;
  int num_shared_blocks() const;

 private:
  struct Sequence {
    std::vector<int> block_table;
    int num_tokens = 0;
  };
  Sequence& get(int64_t seq_id);
  const Sequence& get(int64_t seq_id) const;
  bool last_block_shared(const Sequence& seq) const;

  int block_size_;
  BlockAllocator allocator_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace pagedgpt2

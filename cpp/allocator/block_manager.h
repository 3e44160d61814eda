// Block tables: which blocks hold each sequence's keys and values.
//
// A sequence grows one slot at a time; when its last block is full it gets a new one from the
// allocator. Forked sequences share every block by reference count; the first write into a
// shared, partly filled last block copies it (copy-on-write), and the caller is told which
// copies the backend must make before the step runs.
//
// Prefix caching (optional): every block that fills up is registered under a hash of its tokens
// and its parent block's hash, so the hash names the whole prefix. A new sequence whose prompt
// starts with registered blocks shares them instead of computing them again. Unowned registered
// blocks stay in the pool as evictable (see BlockAllocator) until a free block is needed.
//
// The contiguous mode ("standard caching") is the same class with block_size = max_seq_len and
// each sequence given its one block on its first token: the same interface, different memory.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "allocator/block_allocator.h"

namespace pagedgpt2 {

struct BlockCopy {
  int src;
  int dst;
};

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size, bool enable_prefix_caching = false);
  BlockManager(const BlockManager&) = delete;  // the allocator's eviction callback holds `this`
  BlockManager& operator=(const BlockManager&) = delete;

  int block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  const BlockAllocator& allocator() const { return allocator_; }

  // Blocks a sequence needs to hold num_tokens tokens.
  int blocks_for(int num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }
  bool can_allocate(int num_tokens) const { return blocks_for(num_tokens) <= allocator_.num_free(); }

  // A new, empty sequence. Throws if seq_id exists.
  void add_sequence(int64_t seq_id);
  // With prefix caching, an empty sequence takes the registered blocks holding the longest
  // prefix of tokens[0, num_tokens) made of whole blocks, leaving at least one token to compute.
  // Returns the number of tokens it now holds (0 without prefix caching or without a hit).
  int match_prefix(int64_t seq_id, const int32_t* tokens, int num_tokens);
  // Makes room for the sequence's next num_new_tokens tokens (their ids in tokens) and appends
  // their cache slots to *slots. Returns the block copies the backend must make first
  // (copy-on-write). Throws std::runtime_error, changing nothing, when the pool is too small.
  std::vector<BlockCopy> append_slots(int64_t seq_id, const int32_t* tokens, int num_new_tokens,
                                      std::vector<int32_t>* slots);
  // Blocks append_slots(seq_id, ..., n) would take from the pool.
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
  // Block-table entries over all sequences: the blocks they would hold without sharing.
  int64_t num_logical_blocks() const;
  int num_cached_blocks() const { return static_cast<int>(block_of_hash_.size()); }
  int64_t num_prefix_queried_blocks() const { return num_queried_blocks_; }
  int64_t num_prefix_hit_blocks() const { return num_hit_blocks_; }

 private:
  struct Sequence {
    std::vector<int> block_table;
    int num_tokens = 0;
    std::vector<int32_t> tokens;  // kept only with prefix caching: the hashes need them
  };
  Sequence& get(int64_t seq_id);
  const Sequence& get(int64_t seq_id) const;
  bool last_block_shared(const Sequence& seq) const;
  uint64_t parent_hash(const Sequence& seq, int block_index) const;
  uint64_t hash_block(uint64_t parent, const int32_t* tokens) const;
  bool holds(int block_id, uint64_t parent, const int32_t* tokens) const;
  void register_full_blocks(Sequence& seq, int first_new_token);
  void forget(int block_id);

  int block_size_;
  bool prefix_caching_;
  BlockAllocator allocator_;
  std::unordered_map<int64_t, Sequence> seqs_;
  // Prefix cache: hash of a prefix ending at a block boundary -> the block holding its last part.
  std::unordered_map<uint64_t, int> block_of_hash_;
  std::vector<uint64_t> hash_of_block_;     // [num_blocks] valid while the block is registered
  std::vector<uint64_t> parent_of_block_;   // [num_blocks] parent hash, to check a hit exactly
  std::vector<int32_t> tokens_of_block_;    // [num_blocks, block_size], to check a hit exactly
  int64_t num_queried_blocks_ = 0;
  int64_t num_hit_blocks_ = 0;
};

}  // namespace pagedgpt2

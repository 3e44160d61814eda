// The block pool's bookkeeping: which block ids are free, and how many owners each used block has.
// It knows nothing of sequences or tensors: it hands out ids in [0, num_blocks). The KV tensors
// themselves live in the backend; the kernels only ever see the ids through block tables.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedgpt2 {

class BlockAllocator {
 public:
  explicit BlockAllocator(int num_blocks);

  // A free block with one owner. Throws std::runtime_error when the pool is exhausted.
  int allocate();
  // One more owner of a used block (a fork shares it).
  void share(int block_id);
  // One owner fewer; the block returns to the free list when none remain.
  // Throws std::logic_error on a free block (double free) or an id outside the pool.
  void release(int block_id);

  int ref_count(int block_id) const;
  int num_blocks() const { return static_cast<int>(ref_counts_.size()); }
  int num_free() const { return static_cast<int>(free_ids_.size()); }
  int num_used() const { return num_blocks() - num_free(); }

 private:
  void check_used(int block_id, const char* what) const;

  std::vector<int> free_ids_;    // stack: the most recently freed block is reused first
  std::vector<int> ref_counts_;  // [num_blocks] 0 = free
};

}  // namespace pagedgpt2

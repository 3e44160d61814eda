#include "allocator/block_allocator.h"

#include <stdexcept>
#include <string>

namespace pagedgpt2 {

BlockAllocator::BlockAllocator(int num_blocks) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks must be >= 1");
  ref_counts_.assign(num_blocks, 0);
  free_ids_.reserve(num_blocks);
  for (int id = num_blocks - 1; id >= 0; --id) free_ids_.push_back(id);  // hand out 0 first
}

int BlockAllocator::allocate() {
  if (free_ids_.empty()) {
    throw std::runtime_error("KV block pool exhausted: all " + std::to_string(num_blocks()) +
                             " blocks are in use");
  }
  int id = free_ids_.back();
  free_ids_.pop_back();
  ref_counts_[id] = 1;
  return id;
}

void BlockAllocator::share(int block_id) {
  check_used(block_id, "share");
  ++ref_counts_[block_id];
}

void BlockAllocator::release(int block_id) {
  check_used(block_id, "release");
  if (--ref_counts_[block_id] == 0) free_ids_.push_back(block_id);
}

int BlockAllocator::ref_count(int block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " outside the pool of " +
                            std::to_string(num_blocks()));
  }
  return ref_counts_[block_id];
}

void BlockAllocator::check_used(int block_id, const char* what) const {
  if (ref_count(block_id) == 0) {
    throw std::logic_error(std::string(what) + " of free block " + std::to_string(block_id));
  }
}

}  // namespace pagedgpt2

#include "allocator/block_allocator.h"

#include <stdexcept>
#include <string>

namespace pagedgpt2 {

BlockAllocator::BlockAllocator(int num_blocks) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks must be >= 1");
  ref_counts_.assign(num_blocks, 0);
  cached_.assign(num_blocks, false);
  is_evictable_.assign(num_blocks, false);
  evictable_pos_.resize(num_blocks);
  free_ids_.reserve(num_blocks);
  for (int id = num_blocks - 1; id >= 0; --id) free_ids_.push_back(id);  // hand out 0 first
}

int BlockAllocator::allocate() {
  int id;
  if (!free_ids_.empty()) {
    id = free_ids_.back();
    free_ids_.pop_back();
  } else if (!evictable_.empty()) {
    id = evictable_.front();
    evictable_.pop_front();
    is_evictable_[id] = false;
    cached_[id] = false;
    if (on_evict_) on_evict_(id);
  } else {
    throw std::runtime_error("KV block pool exhausted: all " + std::to_string(num_blocks()) +
                             " blocks are in use");
  }
  ref_counts_[id] = 1;
  return id;
}

void BlockAllocator::share(int block_id) {
  check_id(block_id);
  if (is_evictable_[block_id]) {
    evictable_.erase(evictable_pos_[block_id]);
    is_evictable_[block_id] = false;
  } else {
    check_used(block_id, "share");
  }
  ++ref_counts_[block_id];
}

void BlockAllocator::release(int block_id) {
  check_used(block_id, "release");
  if (--ref_counts_[block_id] > 0) return;
  if (cached_[block_id]) {
    evictable_pos_[block_id] = evictable_.insert(evictable_.end(), block_id);
    is_evictable_[block_id] = true;
  } else {
    free_ids_.push_back(block_id);
  }
}

void BlockAllocator::set_cached(int block_id, bool cached) {
  check_used(block_id, "set_cached");
  cached_[block_id] = cached;
}

int BlockAllocator::check_id(int block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " outside the pool of " +
                            std::to_string(num_blocks()));
  }
  return block_id;
}

void BlockAllocator::check_used(int block_id, const char* what) const {
  if (ref_count(block_id) == 0) {
    throw std::logic_error(std::string(what) + " of free block " + std::to_string(block_id));
  }
}

}  // namespace pagedgpt2

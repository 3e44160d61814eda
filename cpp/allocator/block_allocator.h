// The block pool's bookkeeping: which block ids are free, and how many owners each used block has.
// It knows nothing of sequences or tensors: it hands out ids in [0, num_blocks). The KV tensors
// themselves live in the backend; the kernels only ever see the ids through block tables.
//
// With prefix caching, a block whose last owner leaves may still hold a cached prefix: it is then
// "evictable" rather than free — kept in least-recently-released order and handed out only when
// no free block is left, at which point the owner of the cache is told to forget it.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <vector>

namespace pagedgpt2 {

class BlockAllocator {
 public:
  explicit BlockAllocator(int num_blocks);

  // A block with one owner: a free one, else the least recently released evictable one (the
  // eviction callback is told first). Throws std::runtime_error when neither exists.
  int allocate();
  // One more owner of a used block (a fork shares it), or the first owner of an evictable block
  // (a prefix-cache hit brings it back).
  void share(int block_id);
  // One owner fewer. At none, the block becomes evictable if it is marked cached, else free.
  // Throws std::logic_error on a free block (double free) or an id outside the pool.
  void release(int block_id);

  // Marks a block as holding a cached prefix (or not). Only the owner of the cache calls this.
  void set_cached(int block_id, bool cached);
  bool is_cached(int block_id) const { return cached_[check_id(block_id)]; }
  void set_eviction_callback(std::function<void(int)> on_evict) { on_evict_ = std::move(on_evict); }

  int ref_count(int block_id) const { return ref_counts_[check_id(block_id)]; }
  int num_blocks() const { return static_cast<int>(ref_counts_.size()); }
  // Blocks allocate() can hand out: free ones plus evictable ones.
  int num_free() const { return static_cast<int>(free_ids_.size() + evictable_.size()); }
  int num_evictable() const { return static_cast<int>(evictable_.size()); }
  int num_used() const { return num_blocks() - num_free(); }

 private:
  int check_id(int block_id) const;
  void check_used(int block_id, const char* what) const;

  std::vector<int> free_ids_;    // stack: the most recently freed block is reused first
  std::vector<int> ref_counts_;  // [num_blocks] 0 = free or evictable
  std::vector<bool> cached_;     // [num_blocks] holds a prefix-cache entry
  std::list<int> evictable_;     // unowned cached blocks, least recently released first
  std::vector<std::list<int>::iterator> evictable_pos_;  // [num_blocks] valid while evictable
  std::vector<bool> is_evictable_;                        // [num_blocks]
  std::function<void(int)> on_evict_;
};

}  // namespace pagedgpt2

// Decode attention kernel (see attention_decode.cuh for the work split).
//
// One pass with an online softmax (flash-decoding inside a thread block). A block streams its
// partition through shared memory in tiles of kTile tokens (K and V rows of its G heads: one,
// or four side by side), kStages tiles in flight with cp.async, so DRAM keeps receiving
// requests while the block computes. For head size D and element type T a row of D elements is
// read from shared memory by kLanes lanes (a lane group), each taking kVecsPerLane 16-byte
// vectors, interleaved so a group reads one contiguous row; group g of a head scores tokens g,
// g + kGroups, ... of each tile. Every group keeps its own running max m, sum l and output slice
// acc (fp32; scores in the log2 domain: q is pre-scaled by log2(e) / sqrt(D)); at the end the
// groups of a head merge (shuffles inside a warp, then shared memory across warps when the
// whole block is on one head).
// NOTE: given slot_mapping, the kernel also does write_kv for its rows: the block holding a
// sequence's last token stores its heads' new K and V rows into their cache slot, and scores
// that token from qkv (not from the slot it is writing). A wide decode step saves a launch.
// NOTE: the newest token is always scored from qkv, even where the QKV GEMV has written its slot:
// every other row is an earlier step's, so a block launched programmatically copies all its
// first tiles but that one row before it waits, and the row after. H200, gpt2 batch 1: see
// notes.md (thirteenth session).
#include <cmath>

#include "cuda/attention_decode.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/write_kv.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMinPartitionSize = 64;
constexpr int kTargetBlocksPerSm = 4;  // split until the grid has this many blocks per SM
// K + V of one tile, as aimed for, and of all stages: a block on one head streams 8 KB tiles,
// four deep; a block of four heads 16 KB tiles (one cache block of 16 tokens for gpt2), two deep.
// NOTE: four heads, H200, gpt2 at batch 256 x 192 tokens: 16 KB x 2 39.6 us a launch against
// 40.6-40.9 with 8 KB x 4 (256 x 256: 50.8 against 52.1-52.5); 4 KB x 4 44.6, 8 KB x 3 40.8,
// 12 KB x 2 or 3 40.2-40.5 (notes.md, eleventh session). Both use 32 KB of shared memory.
template <int G>
constexpr int kStageBytes = G == 1 ? 8 * 1024 : 16 * 1024;
template <int G>
constexpr int kPipeBytes = G == 1 ? 36 * 1024 : 32 * 1024;

constexpr int largest_pow2_dividing(int n, int cap) {
  int p = 1;
  while (p * 2 <= cap && n % (p * 2) == 0) p *= 2;
  return p;
}

constexpr int clamp_int(int x, int lo, int hi) { return x < lo ? lo : x > hi ? hi : x; }

// G heads per thread block: 1 (all warps on one head) or kWarps (a warp per head).
template <typename T, int D, int G>
struct DecodeLayout {
  static_assert(G == 1 || G == kWarps, "a head is one warp or the whole block");
  static constexpr int kVec = kVec16<T>;                            // elements per 16 bytes
  static constexpr int kVecs = D / kVec;                            // vectors per row
  static constexpr int kLanes = largest_pow2_dividing(kVecs, 32);   // lanes per row
  static constexpr int kVecsPerLane = kVecs / kLanes;
  static constexpr int kHeadThreads = kThreads / G;                 // threads on one head
  static constexpr int kHeadWarps = kHeadThreads / 32;
  static constexpr int kGroups = kHeadThreads / kLanes;             // rows a head scores at once
  static constexpr int kTokenBytes = 2 * G * D * int(sizeof(T));    // K + V of a token, G heads
  // Tokens per tile: a multiple of kGroups near kStageBytes of K + V.
  static constexpr int kTile = kStageBytes<G> / kTokenBytes / kGroups * kGroups > 0
                                   ? kStageBytes<G> / kTokenBytes / kGroups * kGroups
                                   : kGroups;
  static constexpr int kPerGroup = kTile / kGroups;                 // tokens per group per tile
  static constexpr int kStages = clamp_int(kPipeBytes<G> / (kTile * kTokenBytes), 2, 4);
};

// Running softmax state (m, l) and output slice acc of one lane group, merged with another
// group's: both rescaled to the larger max. A group that saw no token has m = -inf, l = 0.
template <int N>
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[N], float m_o,
                                            float l_o, const float (&acc_o)[N]) {
  const float m_new = fmaxf(m, m_o);
  const float a = m == -INFINITY ? 0.f : exp2f(m - m_new);
  const float b = m_o == -INFINITY ? 0.f : exp2f(m_o - m_new);
  l = l * a + l_o * b;
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = acc[i] * a + acc_o[i] * b;
  m = m_new;
}

constexpr int kMergeBatch = 8;  // partitions merge_partitions loads at once

// Split path, run by the threads of one (sequence, head) (thread `t` of `n`) once the last of
// its num_parts partitions has published: out_row = the partials merged and normalized.
// NOTE: a thread loads the max, sum and output of kMergeBatch partitions at once (one L2 round
// trip, where three loops of dependent loads were) and merges them online, batch after batch.
// At batch 1 the graphs' 64-token partitions make every layer merge 2-4 of them.
template <typename T>
__device__ void merge_partitions(T* out_row, const DecodeWorkspace& ws, int64_t first,
                                 int num_parts, int D, int t, int n) {
  for (int d = t; d < D; d += n) {
    float o[1];
    const float l = merge_partials<1, kMergeBatch>(ws, first, num_parts, D, d, o);
    out_row[d] = from_float<T>(o[0] / l);
  }
}

// Split path, once the threads of one (sequence, head) (thread `t` of `n`: one warp, or the
// whole block with kWholeBlock) have written this partition's partial_out row `row` (of the
// head's num_parts rows from first_row): publishes its max m and sum l and counts it; the last
// of the partitions to do so merges them all into out_row and resets the count. is_last: a
// shared flag, for the whole block. merge_later: only m and l are written (the proj GEMV merges
// the partitions: SkinnyInput::kAttentionPartials).
template <bool kWholeBlock, typename T>
__device__ void publish_partition(T* out_row, const DecodeWorkspace& ws, int64_t sh,
                                  int64_t first_row, int64_t row, int num_parts, float m, float l,
                                  int D, int t, int n, bool* is_last, bool merge_later) {
  if (t == 0) {
    ws.partial_max[row] = m;
    ws.partial_sum[row] = l;
  }
  if (merge_later) return;
  __threadfence();
  bool last = false;
  if constexpr (kWholeBlock) {
    __syncthreads();
    if (t == 0) *is_last = atomicAdd(&ws.counters[sh], 1u) == unsigned(num_parts - 1);
    __syncthreads();
    last = *is_last;
  } else {
    __syncwarp();
    if (t == 0) last = atomicAdd(&ws.counters[sh], 1u) == unsigned(num_parts - 1);
    last = __shfl_sync(0xffffffffu, last, 0);
  }
  if (!last) return;
  __threadfence();
  merge_partitions(out_row, ws, first_row, num_parts, D, t, n);
  if (t == 0) ws.counters[sh] = 0;  // ready for the next launch (and graph replay)
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(T* __restrict__ out,                      // [S, H * D]
                            const T* __restrict__ qkv,                // [S, 3 * H * D]
                            T* k_cache,                               // [num_blocks, bs, H, D]
                            T* v_cache,                               // [num_blocks, bs, H, D]
                            const int32_t* __restrict__ context_lens, // [S]
                            const int32_t* __restrict__ block_tables, // [S, max_blocks]
                            const int32_t* __restrict__ slot_mapping, // [S] or nullptr
                            int num_heads, int max_blocks, int block_size,
                            int block_shift,  // log2(block_size), or -1 if not a power of 2
                            float q_scale, int partition_size, int max_partitions,
                            DecodeWorkspace ws, L2Range prefetch,
                            bool early_loads,  // launched programmatically: load before pdl_wait
                            bool merge_later) {  // every partition's partial is left to the GEMV
  using L = DecodeLayout<T, D, G>;
  constexpr int kVec = L::kVec, kVecs = L::kVecs, kLanes = L::kLanes, kVpl = L::kVecsPerLane;
  constexpr int kGroups = L::kGroups, kTile = L::kTile, kStages = L::kStages;
  constexpr int kHeadThreads = L::kHeadThreads, kHeadWarps = L::kHeadWarps;
  constexpr int kAcc = kVpl * kVec;
  __shared__ __align__(16) T k_tiles[kStages][kTile * G * D];  // [token, head of block, D]
  __shared__ __align__(16) T v_tiles[kStages][kTile * G * D];
  __shared__ float red_acc[kHeadWarps > 1 ? kWarps : 1][D];
  __shared__ float red_m[kWarps], red_l[kWarps];
  __shared__ bool is_last;  // the block-per-head split path's last-arriver flag

  pdl_launch_dependents();  // the proj GEMV may start streaming its weights
  prefetch_l2_share(prefetch, blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z),
                    gridDim.x * gridDim.y * gridDim.z);
  const int s = blockIdx.y, part = blockIdx.z;
  const int H = num_heads, C = H * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int head_in_block = tid / kHeadThreads, head_tid = tid % kHeadThreads;
  const int h = blockIdx.x * G + head_in_block;
  const int heads_here = min(G, H - int(blockIdx.x) * G);  // the last block may have fewer
  const bool has_head = head_in_block < heads_here;
  const int lane_in_group = head_tid % kLanes, group = head_tid / kLanes;
  // Step inputs (context_lens, block_tables, slot_mapping) are written before the step's kernels;
  // the cache rows of earlier tokens by earlier steps. So the partition and its first tiles are
  // known, and copied, before the kernel before this one has finished (pdl_wait).
  const int context_len = context_lens[s];
  const int num_parts = context_len > 0 ? (context_len + partition_size - 1) / partition_size : 0;
  const int start = part * partition_size;
  const int end = min(context_len, start + partition_size);
  const int num_tiles = (end - start + kTile - 1) / kTile;
  const int32_t* table = block_tables + int64_t(s) * max_blocks;
  const int64_t block_offset = int64_t(blockIdx.x) * G * D;  // first head's column
  // The newest token's K and V are this step's: read from qkv (after pdl_wait), not its slot.
  const int fresh = context_len - 1;
  const T* k_fresh = qkv + int64_t(s) * 3 * C + C + block_offset;
  const T* v_fresh = k_fresh + C;
  // Element offset of this lane's vector j inside a row of D.
  auto col = [&](int j) { return (lane_in_group + j * kLanes) * kVec; };

  // Starts copying tile `tile` of the partition into its stage: per token, the G heads' rows
  // are one contiguous run of the cache. Past the partition's end (or past the last head) the
  // rows are zero-filled (their scores are masked). Every call commits one group, possibly
  // empty, so that cp_async_wait counts tiles. skip_fresh: the fresh row is left out (before
  // pdl_wait; the block stores it after).
  auto issue = [&](int tile, bool skip_fresh) {
    if (tile < num_tiles) {
      T* k_dst = k_tiles[tile % kStages];
      T* v_dst = v_tiles[tile % kStages];
      for (int i = tid; i < kTile * G * kVecs; i += kThreads) {
        const int r = i / (G * kVecs), e = i % (G * kVecs);  // token; vector in its G rows
        const int t = start + tile * kTile + r;
        const bool valid = t < end && e / kVecs < heads_here;
        // (A tile may reach past the partition into the next one's tokens, the fresh row among
        // them: those rows are zero-filled here like any past the end.)
        if (skip_fresh && t == fresh && t < end) continue;
        const int b = block_shift >= 0 ? t >> block_shift : t / block_size;
        const int offset = block_shift >= 0 ? t & (block_size - 1) : t % block_size;
        const int64_t slot = valid && t != fresh ? int64_t(__ldg(table + b)) * block_size + offset
                                                 : 0;
        const int64_t src = slot * C + block_offset + e * kVec;
        cp_async16(k_dst + i * kVec, t == fresh ? k_fresh + e * kVec : k_cache + src, valid);
        cp_async16(v_dst + i * kVec, t == fresh ? v_fresh + e * kVec : v_cache + src, valid);
      }
    }
    cp_async_commit();
  };
  // The first tiles before waiting, but for the newest token's row. NOTE: H200, 128 + 128
  // tokens: gpt2 batch 1 +3% (0.387 -> 0.375 ms a step), gpt2-xl batch 1 +1%; wider steps alike
  // (cuBLASLt's GEMMs before them do not let it start early). notes.md, tenth session.
  const bool early = early_loads && part < num_parts;
  if (early) {
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) issue(i, true);
  }
  // NOTE: starting a head as soon as the skinny QKV GEMV had counted its rows written (a fence
  // and an atomic a row; blocks spinning on the counts) instead of at the GEMV's end was slower
  // on an H200: gpt2 batch 1 0.236 -> 0.264 ms (notes.md, twenty-fourth session).
  pdl_wait();  // q, the newest K/V and out belong to the kernels before
  T* out_row = out + int64_t(s) * C + int64_t(h) * D;
  if (context_len <= 0) {  // padding row of a graph bucket
    if (part == 0 && has_head) {
      for (int d = head_tid; d < D; d += kHeadThreads) out_row[d] = from_float<T>(0.f);
    }
    return;
  }
  if (part >= num_parts) return;
  // q's loads go out first, as they are (converted and scaled below), so that their round trip
  // overlaps the newest row's (and the first tiles still in flight).
  Vec<T, kVec> q_in[kVpl];
  {
    const T* q_row = qkv + int64_t(s) * 3 * C + int64_t(has_head ? h : 0) * D;
#pragma unroll
    for (int j = 0; j < kVpl; ++j) {
      q_in[j] = *reinterpret_cast<const Vec<T, kVec>*>(q_row + col(j));
    }
  }
  if (slot_mapping && part == num_parts - 1) {
    const int64_t slot = slot_mapping[s];  // -1: not written
    if (slot >= 0) {
      store_kv_row<T, kVec>(k_cache, v_cache, slot, C, block_offset, k_fresh, v_fresh,
                            heads_here * kVecs, tid, kThreads);
    }
  }
  if (!early) {
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) issue(i, false);
  } else if (fresh >= start && fresh < end && (fresh - start) / kTile < kStages - 1) {
    // The fresh row of a tile copied early, stored by the threads (the tile loop's barrier
    // publishes it with the tile).
    const int r = (fresh - start) % kTile;
    T* k_dst = k_tiles[(fresh - start) / kTile % kStages] + r * G * D;
    T* v_dst = v_tiles[(fresh - start) / kTile % kStages] + r * G * D;
    for (int e = tid; e < G * kVecs; e += kThreads) {
      Vec<T, kVec> kv{}, vv{};
      if (e / kVecs < heads_here) {
        kv = *reinterpret_cast<const Vec<T, kVec>*>(k_fresh + e * kVec);
        vv = *reinterpret_cast<const Vec<T, kVec>*>(v_fresh + e * kVec);
      }
      *reinterpret_cast<Vec<T, kVec>*>(k_dst + e * kVec) = kv;
      *reinterpret_cast<Vec<T, kVec>*>(v_dst + e * kVec) = vv;
    }
  }

  float q[kVpl][kVec];  // pre-scaled
#pragma unroll
  for (int j = 0; j < kVpl; ++j) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) q[j][e] = to_float(q_in[j].v[e]) * q_scale;
  }
  float m = -INFINITY, l = 0.f, acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `tile` have landed ...
    __syncthreads();               // ... and everyone's; the stage of tile - 1 is free
    issue(tile + kStages - 1, false);
    if (!has_head) continue;  // a warp past the last head only copies
    const T* k_tile = k_tiles[tile % kStages] + head_in_block * D;
    const T* v_tile = v_tiles[tile % kStages] + head_in_block * D;
    const int first = start + tile * kTile;

    float score[L::kPerGroup];
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < L::kPerGroup; ++u) {
      const int r = u * kGroups + group;
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < kVpl; ++j) {
        const Vec<T, kVec> k =
            *reinterpret_cast<const Vec<T, kVec>*>(k_tile + r * G * D + col(j));
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += q[j][e] * to_float(k.v[e]);
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      score[u] = first + r < end ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, score[u]);
    }
    if (tile_max == -INFINITY) continue;  // no token of this group in this tile
    const float m_new = fmaxf(m, tile_max);
    const float rescale = exp2f(m - m_new);  // 0 on the group's first token (m = -inf)
    l *= rescale;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] *= rescale;
#pragma unroll
    for (int u = 0; u < L::kPerGroup; ++u) {
      const int r = u * kGroups + group;
      const float p = exp2f(score[u] - m_new);  // 0 for masked rows (zero-filled V)
      l += p;
#pragma unroll
      for (int j = 0; j < kVpl; ++j) {
        const Vec<T, kVec> v =
            *reinterpret_cast<const Vec<T, kVec>*>(v_tile + r * G * D + col(j));
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[j * kVec + e] += p * to_float(v.v[e]);
      }
    }
    m = m_new;
  }
  cp_async_wait<0>();  // no copy may outlive the block (the trailing groups are empty)
  if (!has_head) return;  // whole warps (G == kWarps): no block-wide barrier follows

  // Merge the lane groups of a warp (lanes i and i ^ o hold the same slice of D).
#pragma unroll
  for (int o = kLanes; o < 32; o <<= 1) {
    float acc_o[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc_o[i] = __shfl_xor_sync(0xffffffffu, acc[i], o);
    const float m_o = __shfl_xor_sync(0xffffffffu, m, o);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, o);
    merge_state(m, l, acc, m_o, l_o, acc_o);
  }
  const int64_t sh = int64_t(s) * H + h;
  const int64_t first_row = sh * max_partitions;

  if constexpr (kHeadWarps == 1) {
    // A warp per head: its lanes hold the head's state ((m, l) everywhere, acc by column).
    if (num_parts == 1 && !merge_later) {
      if (lane < kLanes) {
        const float inv = 1.f / l;
#pragma unroll
        for (int j = 0; j < kVpl; ++j) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            out_row[col(j) + e] = from_float<T>(acc[j * kVec + e] * inv);
          }
        }
      }
      return;
    }
    // ---- split path: publish this partition, the last one to finish merges (merge_later:
    // the proj GEMV merges them all).
    const int64_t row = first_row + part;
    if (lane < kLanes) {
#pragma unroll
      for (int j = 0; j < kVpl; ++j) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) ws.partial_out[row * D + col(j) + e] = acc[j * kVec + e];
      }
    }
    publish_partition<false>(out_row, ws, sh, first_row, row, num_parts, m, l, D, lane, 32,
                             nullptr, merge_later);
  } else {
    // The block on one head: merge the warps through shared memory, weights exp2(m_w - max_m)
    // (a warp with no token has m_w = -inf: 0).
    if (lane < kLanes) {
#pragma unroll
      for (int j = 0; j < kVpl; ++j) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) red_acc[warp][col(j) + e] = acc[j * kVec + e];
      }
      if (lane == 0) red_m[warp] = m, red_l[warp] = l;
    }
    __syncthreads();
    float max_m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) max_m = fmaxf(max_m, red_m[w]);
    float weight[kWarps], sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      weight[w] = red_m[w] == -INFINITY ? 0.f : exp2f(red_m[w] - max_m);
      sum += red_l[w] * weight[w];
    }
    auto merged = [&](int d) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += red_acc[w][d] * weight[w];
      return o;
    };
    if (num_parts == 1 && !merge_later) {
      const float inv = 1.f / sum;
      for (int d = tid; d < D; d += kThreads) out_row[d] = from_float<T>(merged(d) * inv);
      return;
    }
    // ---- split path: publish this partition, the last one to finish merges.
    const int64_t row = first_row + part;
    for (int d = tid; d < D; d += kThreads) ws.partial_out[row * D + d] = merged(d);
    publish_partition<true>(out_row, ws, sh, first_row, row, num_parts, max_m, sum, D, tid,
                            kThreads, &is_last, merge_later);
  }
}

template <typename T, int D, int G>
void launch_d(T* out, const T* qkv, T* k_cache, T* v_cache, const int32_t* context_lens,
              const int32_t* block_tables, const int32_t* slot_mapping, int num_seqs,
              int max_blocks, int num_heads, int block_size, int max_context_len,
              int partition_size, const DecodeWorkspace& ws, cudaStream_t stream, bool pdl,
              L2Range prefetch, bool merge_later) {
  const int num_parts = decode_num_partitions(max_context_len, partition_size);
  if ((num_parts > 1 || merge_later) &&
      (int64_t(num_seqs) * num_heads * num_parts > ws.capacity_rows ||
       int64_t(num_seqs) * num_heads > ws.capacity_counters)) {
    throw std::runtime_error("decode attention: split workspace too small for this batch");
  }
  const float q_scale = float(M_LOG2E / std::sqrt(double(D)));
  int block_shift = -1;  // log2(block_size) when it is a power of two
  for (int b = 0; b < 31 && block_shift < 0; ++b) {
    if (block_size == 1 << b) block_shift = b;
  }
  launch_kernel(decode_attention_kernel<T, D, G>,
                dim3((num_heads + G - 1) / G, num_seqs, num_parts), dim3(kThreads), 0, stream,
                pdl, out, qkv, k_cache, v_cache, context_lens, block_tables, slot_mapping,
                num_heads, max_blocks, block_size, block_shift, q_scale, partition_size, num_parts,
                ws, prefetch, pdl, merge_later);
}

template <typename T, int D>
void launch_heads(int heads_per_block, T* out, const T* qkv, T* k_cache, T* v_cache,
                  const int32_t* context_lens, const int32_t* block_tables,
                  const int32_t* slot_mapping, int num_seqs, int max_blocks, int num_heads,
                  int block_size, int max_context_len, int partition_size,
                  const DecodeWorkspace& ws, cudaStream_t stream, bool pdl, L2Range prefetch,
                  bool merge_later) {
  auto launch = heads_per_block == 1 ? launch_d<T, D, 1> : launch_d<T, D, kWarps>;
  launch(out, qkv, k_cache, v_cache, context_lens, block_tables, slot_mapping, num_seqs,
         max_blocks, num_heads, block_size, max_context_len, partition_size, ws, stream, pdl,
         prefetch, merge_later);
}

}  // namespace

int decode_heads_per_block(int num_seqs, int num_heads, int num_sms) {
  // NOTE: a block per head streams 128-byte rows (gpt2) and pays its pipeline fill and merge per
  // head; a warp per head reads four heads' rows as one run per token and pays those once for
  // four heads, but each warp then scores a quarter of the tokens a block per head would. On an
  // H200 it won only where four-head blocks still fill the GPU kTargetBlocksPerSm deep unsplit
  // (batch 256 x 192: 70% -> 77% of copy bandwidth) and lost elsewhere (64 x 1024: 83% -> 71%;
  // 25 heads, whose last block has one: 82% -> 80%). Figures: notes.md (seventh session).
  if (num_heads % kWarps != 0) return 1;
  const int64_t blocks = int64_t(num_seqs) * (num_heads / kWarps);
  return blocks >= int64_t(kTargetBlocksPerSm) * num_sms ? kWarps : 1;
}

int decode_partition_count(int num_seqs, int num_heads, int max_context_len, int num_sms,
                           int heads_per_block) {
  max_context_len = std::max(max_context_len, 1);
  const int64_t items = int64_t(num_seqs) * ((num_heads + heads_per_block - 1) / heads_per_block);
  // NOTE: split until the grid holds kTargetBlocksPerSm blocks per SM, never below
  // kMinPartitionSize tokens per block. The one-pass kernel has no per-partition limit; a split
  // costs one partial row per block and a merge by the last block. Measured choices: notes.md.
  int parts =
      int(std::max<int64_t>(1, (int64_t(kTargetBlocksPerSm) * num_sms + items - 1) / items));
  return std::min(parts, std::max(1, max_context_len / kMinPartitionSize));
}

int decode_partition_size(int num_seqs, int num_heads, int max_context_len, int num_sms,
                          int heads_per_block) {
  max_context_len = std::max(max_context_len, 1);
  const int parts =
      decode_partition_count(num_seqs, num_heads, max_context_len, num_sms, heads_per_block);
  const int size = (max_context_len + parts - 1) / parts;
  return (size + kMinPartitionSize - 1) / kMinPartitionSize * kMinPartitionSize;
}

bool decode_attention_supported(int head_size, int elem_size) {
  (void)elem_size;
  switch (head_size) {
    case 16: case 32: case 48: case 64: case 80: case 96: case 128: case 256: return true;
    default: return false;
  }
}

template <typename T>
void launch_decode_attention(T* out, const T* qkv, T* k_cache, T* v_cache,
                             const int32_t* context_lens, const int32_t* block_tables,
                             const int32_t* slot_mapping, int num_seqs, int max_blocks,
                             int num_heads, int head_size, int block_size, int max_context_len,
                             int partition_size, int heads_per_block, const DecodeWorkspace& ws,
                             cudaStream_t stream, bool pdl, L2Range prefetch, bool merge_later) {
  if (num_seqs <= 0) return;
  if (heads_per_block != 1 && heads_per_block != kWarps) {
    throw std::invalid_argument("decode attention: heads_per_block must be 1 or " +
                                std::to_string(kWarps) + ", got " +
                                std::to_string(heads_per_block));
  }
#define CASE(D)                                                                                 \
  case D:                                                                                       \
    return launch_heads<T, D>(heads_per_block, out, qkv, k_cache, v_cache, context_lens,       \
                              block_tables, slot_mapping, num_seqs, max_blocks, num_heads,     \
                              block_size, max_context_len, partition_size, ws, stream, pdl,    \
                              prefetch, merge_later);
  switch (head_size) {
    CASE(16) CASE(32) CASE(48) CASE(64) CASE(80) CASE(96) CASE(128) CASE(256)
    default:
      throw std::invalid_argument("decode attention: no kernel for head size " +
                                  std::to_string(head_size));
  }
#undef CASE
}

#define INSTANTIATE(T)                                                                       \
  template void launch_decode_attention<T>(T*, const T*, T*, T*, const int32_t*,             \
                                           const int32_t*, const int32_t*, int, int, int, int, \
                                           int, int, int, int, const DecodeWorkspace&,         \
                                           cudaStream_t, bool, L2Range, bool);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace pagedgpt2::cuda

// Persistent decode kernel (see persistent_decode.cuh for the stages).
//
// Block = 8 consumer warps + 1 producer warp, one block per SM (cooperative launch: all blocks
// resident, so grid barriers cannot deadlock).
// Weight schedule: every GEMV stage (QKV, proj, fc, fc_proj per layer, then the LM head) splits
// its N rows evenly over the blocks; block b's rows [n0, n1) are contiguous in W. The producer
// cuts them into chunks of whole rows (as many as fit a ring slot) and bulk-copies chunk after
// chunk into the ring slots, waiting only for a slot to be freed. Consumers walk the same
// schedule, wait for each chunk's bytes (mbarrier transaction count), multiply its rows with the
// staged activations and free the slot.
// Cross-block data (activations, the current token's K/V) is read with ld.global.cg (L2): L1 is
// not coherent between SMs.
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/cuda_common.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/persistent_decode.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
// NOTE: 4 ring slots of ~50 KB, measured against 8 of ~25 KB (gpt2 LM head 30 against 37 µs):
// bigger chunks give each warp more rows at once.
constexpr int kSlots = 4;
constexpr int kHeadSize = 64;
constexpr int kMinPartTokens = 32;  // attention tokens per work item (one per lane)
constexpr int kMaxParts = kPersistentMaxParts;  // per (row, head): one per lane when merging

// ---- Hopper primitives: mbarriers and bulk copies -----------------------------------------
// NOTE: [[maybe_unused]] marks what only the sm_90 kernel body uses (the sm_80 pass compiles a
// stub of it).

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

[[maybe_unused]] __device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

[[maybe_unused]] __device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Arrives and announces `bytes` of bulk copies that will complete on this phase.
[[maybe_unused]] __device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar,
                                                                      unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Waits until the phase of parity `parity` has completed.
[[maybe_unused]] __device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// bytes (a multiple of 16, both addresses 16-aligned) from global to this block's shared memory;
// completion is counted on bar.
[[maybe_unused]] __device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src,
                                                                    unsigned bytes,
                                                                    uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// ---- synchronization among consumers and across the grid ----------------------------------

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

// Grid barrier words, each on its own 128-byte line (PersistentScratch::barrier).
constexpr int kArrived = 0;  // arrivals, growing through a launch
[[maybe_unused]] constexpr int kExited = 32;  // blocks done (the last one zeroes both)

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

[[maybe_unused]] __device__ __forceinline__ unsigned atomic_add_acq_rel(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v)
               : "memory");
  return old;
}

// Every consumer of every block arrives; returns when all have. One release-add per block
// (covering the block's writes, ordered before it by the CTA barrier), then an acquire spin
// on the same word until every block of this barrier has added.
[[maybe_unused]] __device__ __forceinline__ void grid_sync(unsigned* words, unsigned& generation) {
  consumer_sync();
  ++generation;
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(&words[kArrived]) : "memory");
    const unsigned target = generation * gridDim.x;
    while (load_acquire(&words[kArrived]) < target) {
    }
  }
  consumer_sync();
}

// ---- coherent (L2) loads of data other blocks wrote in this launch ------------------------

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_cg(const T* p) {
  static_assert(sizeof(Vec<T, N>) == 16 || sizeof(Vec<T, N>) == 8 || sizeof(Vec<T, N>) == 4);
  Vec<T, N> v;
  if constexpr (sizeof(Vec<T, N>) == 16) {
    *reinterpret_cast<uint4*>(&v) = __ldcg(reinterpret_cast<const uint4*>(p));
  } else if constexpr (sizeof(Vec<T, N>) == 8) {
    *reinterpret_cast<uint2*>(&v) = __ldcg(reinterpret_cast<const uint2*>(p));
  } else {
    *reinterpret_cast<unsigned*>(&v) = __ldcg(reinterpret_cast<const unsigned*>(p));
  }
  return v;
}

// ---- the weight schedule, walked identically by the producer and the consumers ------------

struct GemvStage {
  const void* weight;  // [N, K]
  int N, K;
};

// Stage s (0 QKV, 1 proj, 2 fc, 3 fc_proj) of layer l; layer L is the LM head.
template <typename T>
__device__ __forceinline__ GemvStage gemv_stage(const PersistentDecodeParams<T>& p, int l, int s) {
  if (l == p.L) return {p.wte, p.V, p.C};
  const DecodeLayerWeights<T>& w = p.layers[l];
  switch (s) {
    case 0: return {w.qkv_w, 3 * p.C, p.C};
    case 1: return {w.proj_w, p.C, p.C};
    case 2: return {w.fc_w, p.I, p.C};
    default: return {w.fc_proj_w, p.C, p.I};
  }
}

// This block's rows of a stage, and how many of them one ring slot holds (at most
// kMaxChunkRows: a warp takes up to 4 rows of a chunk at once).
[[maybe_unused]] constexpr int kMaxChunkRows = 4 * kConsumerWarps;

struct BlockRows {
  int n0, n1, per_chunk;
};

template <typename T>
__device__ __forceinline__ BlockRows block_rows(const GemvStage& g, int slot_bytes) {
  BlockRows r;
  r.n0 = int(int64_t(g.N) * blockIdx.x / gridDim.x);
  r.n1 = int(int64_t(g.N) * (blockIdx.x + 1) / gridDim.x);
  r.per_chunk = min(kMaxChunkRows, max(1, slot_bytes / (g.K * int(sizeof(T)))));
  return r;
}

struct Ring {
  char* data;
  int slot_bytes;
  uint64_t* full;   // [kSlots] bytes landed (1 arrival + transactions)
  uint64_t* empty;  // [kSlots] slot read by every consumer warp
};

// The producer (one lane): every chunk of every stage, in the consumers' order, one bulk copy
// each, as soon as its slot is free.
template <typename T>
__device__ void produce(const PersistentDecodeParams<T>& p, const Ring& ring) {
  unsigned chunk = 0;
  for (int l = 0; l <= p.L; ++l) {
    for (int s = 0; s < (l < p.L ? 4 : 1); ++s) {
      const GemvStage g = gemv_stage(p, l, s);
      const BlockRows br = block_rows<T>(g, ring.slot_bytes);
      for (int n = br.n0; n < br.n1; n += br.per_chunk, ++chunk) {
        const int slot = int(chunk % kSlots);
        const unsigned use = chunk / kSlots;
        if (use > 0) mbar_wait(&ring.empty[slot], (use - 1) & 1);  // chunk - slots consumed
        const unsigned bytes = unsigned(min(br.per_chunk, br.n1 - n)) * g.K * sizeof(T);
        mbar_arrive_expect_tx(&ring.full[slot], bytes);
        bulk_copy_to_shared(ring.data + size_t(slot) * ring.slot_bytes,
                            static_cast<const T*>(g.weight) + int64_t(n) * g.K, bytes,
                            &ring.full[slot]);
      }
    }
  }
}

// acc[r][m] += W row r [vector v] . xs[m] [vector v], for the R rows a warp holds.
template <typename T, int M, int R>
__device__ __forceinline__ void fma_vector(const Vec<T, kVec16<T>>* const (&rows)[R], int v,
                                           const float* xs, int K, float (&acc)[R][M]) {
  constexpr int V = kVec16<T>;
  float x[M][V];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float4* xv = reinterpret_cast<const float4*>(xs + m * K + v * V);
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 x4 = xv[q];
      x[m][4 * q] = x4.x, x[m][4 * q + 1] = x4.y, x[m][4 * q + 2] = x4.z, x[m][4 * q + 3] = x4.w;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (!rows[r]) continue;
    const Vec<T, V> wv = rows[r][v];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float wf = to_float(wv.v[e]);
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] += wf * x[m][e];
    }
  }
}

// y[r][m] = W[r, :] . xs[m, :] for the `rows` rows of one chunk; epi(r, m, y) for each.
// Warp w takes rows w, w + 8, ... (R of them, all at once: x is read once for R rows and R x M
// multiply-add chains interleave). A chunk of fewer rows than warps splits each row over `wpr`
// warps (partials meet in shared memory) so that every warp has work.
template <typename T, int M, int R, class Epi>
__device__ __forceinline__ void gemv_rows(const T* w, int rows, int K, const float* xs,
                                          float* partial, Epi&& epi) {
  constexpr int V = kVec16<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int wpr = 1;
  while (wpr < kConsumerWarps && rows * wpr * 2 <= kConsumerWarps) wpr *= 2;
  const int group = warp / wpr, slice = warp % wpr, groups = kConsumerWarps / wpr;
  const Vec<T, V>* row_ptr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = group + r * groups;
    row_ptr[r] = row < rows ? reinterpret_cast<const Vec<T, V>*>(w + int64_t(row) * K) : nullptr;
  }
  // Two accumulator sets (even and odd vectors) halve the dependent chains.
  float acc[R][M], acc2[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = acc2[r][m] = 0.f;
  }
  const int vecs = K / V, step = wpr * 32;
  int v = slice * 32 + lane;
  for (; v + step < vecs; v += 2 * step) {
    fma_vector<T, M, R>(row_ptr, v, xs, K, acc);
    fma_vector<T, M, R>(row_ptr, v + step, xs, K, acc2);
  }
  if (v < vecs) fma_vector<T, M, R>(row_ptr, v, xs, K, acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (o == 16) acc[r][m] += acc2[r][m];
        acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
      }
    }
  }
  if (wpr > 1) {  // R == 1 here: rows < warps
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) partial[warp * M + m] = acc[0][m];
    }
    consumer_sync();
    if (slice == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int j = 0; j < wpr; ++j) sum += partial[(warp + j) * M + m];
        acc[0][m] = sum;
      }
    }
    consumer_sync();  // partial is rewritten by the next chunk
    if (slice != 0) return;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = group + r * groups;
    if (row >= rows) continue;
    float y = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (lane == m) y = acc[r][m];
    }
    if (lane < M) epi(row, lane, y);
  }
}

// The consumers' side of one stage: every chunk of this block's rows; epi(n, i, m, y) for
// output row n, the i-th of this block's rows.
template <typename T, int M, class Epi>
__device__ __forceinline__ void consume_gemv(const GemvStage& g, const Ring& ring, unsigned& chunk,
                                             const float* xs, float* partial, Epi&& epi) {
  const BlockRows br = block_rows<T>(g, ring.slot_bytes);
  for (int n = br.n0; n < br.n1; n += br.per_chunk, ++chunk) {
    const int slot = int(chunk % kSlots);
    mbar_wait(&ring.full[slot], (chunk / kSlots) & 1);
    const T* w = reinterpret_cast<const T*>(ring.data + size_t(slot) * ring.slot_bytes);
    const int rows = min(br.per_chunk, br.n1 - n);
    auto row_epi = [&](int r, int m, float y) { epi(n + r, n + r - br.n0, m, y); };
    switch ((rows + kConsumerWarps - 1) / kConsumerWarps) {
      case 1: gemv_rows<T, M, 1>(w, rows, g.K, xs, partial, row_epi); break;
      case 2: gemv_rows<T, M, 2>(w, rows, g.K, xs, partial, row_epi); break;
      case 3: gemv_rows<T, M, 3>(w, rows, g.K, xs, partial, row_epi); break;
      default: gemv_rows<T, M, 4>(w, rows, g.K, xs, partial, row_epi); break;
    }
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbar_arrive(&ring.empty[slot]);
  }
}

// Biases of this block's rows of a layer's four GEMVs, as float: segment s holds stage s's.
// Loaded ahead of the layer (before the barrier in front of it) into the buffer of the
// layer's parity, so no epilogue waits on memory.
template <typename T>
__device__ __forceinline__ void prefetch_biases(const PersistentDecodeParams<T>& p, int l,
                                                float* bias, int segment, int slot_bytes) {
  const DecodeLayerWeights<T>& w = p.layers[l];
  const T* src[4] = {w.qkv_b, w.proj_b, w.fc_b, w.fc_proj_b};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const BlockRows br = block_rows<T>(gemv_stage(p, l, s), slot_bytes);
    for (int i = threadIdx.x; i < br.n1 - br.n0; i += kConsumers) {
      bias[s * segment + i] = to_float(src[s][br.n0 + i]);
    }
  }
}

// ---- staging the GEMV input rows xs [M, K] (float, rounded to T as the layered path) ------

// ln[0, C) = weight, ln[C, 2C) = bias: loaded before the barrier ahead of a LayerNorm stage, so
// their latency hides in the wait (parameters never depend on activations).
[[maybe_unused]] __device__ __forceinline__ void prefetch_ln(float* ln, const float* weight,
                                                             const float* bias, int C) {
  for (int c = threadIdx.x; c < C; c += kConsumers) {
    const float w = __ldg(weight + c), b = __ldg(bias + c);
    ln[c] = w, ln[C + c] = b;
  }
}

// xs[m] = LayerNorm(residual[row m]) (row m = rows ? rows[m] : m) for m < num_rows, zeros after,
// with the parameters prefetch_ln staged. When embed, the residual rows are first made from
// wte and wpe (block 0 writes them out).
template <typename T, int M>
__device__ void stage_layernorm(const PersistentDecodeParams<T>& p, float* xs, const float* ln,
                                const int32_t* rows, int num_rows, bool embed) {
  const int C = p.C;
  // Every consumer thread loads its share of the M rows with all its loads in flight at once.
  constexpr int kPer = 4;
  for (int i0 = threadIdx.x * 4; i0 < M * C; i0 += kConsumers * 4 * kPer) {
    float4 x[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = i0 + u * kConsumers * 4, m = i / C;
      x[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i >= M * C || m >= num_rows) continue;
      if (embed) {
        const int c = i % C;
        float te[4], pe[4];
        load_floats<T, 4>(p.wte + int64_t(p.token_ids[m]) * C + c, te);
        load_floats<T, 4>(p.wpe + int64_t(p.positions[m]) * C + c, pe);
        x[u] = make_float4(te[0] + pe[0], te[1] + pe[1], te[2] + pe[2], te[3] + pe[3]);
      } else {
        const int64_t row = rows ? rows[m] : m;
        x[u] = __ldcg(reinterpret_cast<const float4*>(p.residual + row * C + i % C));
      }
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = i0 + u * kConsumers * 4;
      if (i >= M * C) continue;
      *reinterpret_cast<float4*>(xs + i) = x[u];
      if (embed && blockIdx.x == 0) *reinterpret_cast<float4*>(p.residual + i) = x[u];
    }
  }
  consumer_sync();
  const int warp = threadIdx.x / 32;
  if (warp < M && warp < num_rows) {
    float* x = xs + warp * C;
    warp_layernorm_row(x, ln, ln + C, C, p.eps,
                       [&](int c, float y) { x[c] = to_float(from_float<T>(y)); });
  }
  consumer_sync();
}

// xs = float(act) for act [M, K] in T, every load of a thread in flight at once.
template <typename T, int M>
__device__ void stage_activation(float* xs, const T* act, int K) {
  constexpr int V = kVec16<T>, kPer = 4;
  const int n = M * K / V;
  for (int i0 = threadIdx.x; i0 < n; i0 += kConsumers * kPer) {
    Vec<T, V> a[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      if (i0 + u * kConsumers < n) a[u] = load_cg<T, V>(act + (i0 + u * kConsumers) * V);
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = i0 + u * kConsumers;
      if (i >= n) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) xs[i * V + e] = to_float(a[u].v[e]);
    }
  }
  consumer_sync();
}

// ---- attention ------------------------------------------------------------------------------

// The work is planned once per step (contexts and block tables do not change across layers) and
// each lane keeps the cache slot of its token, so a layer's attention starts with its loads.
//   block path (every context <= 256 tokens and rows x heads <= blocks): block b takes
//     (row, head) b, warp w its tokens [32 w, 32 w + 32); the 8 partials merge in shared memory.
//   grid path: item i = (row, head, 32-token partition) = (i / (H parts), i / parts % H,
//     i % parts); grid warp g takes items g, g + warps, ...; the last partition of a (row, head)
//     to finish merges them through global scratch.
constexpr int kMaxItemsPerWarp = 4;

struct AttentionPlan {
  bool block_path;
  int parts;                   // grid path: partitions of the longest context
  int item[kMaxItemsPerWarp];  // grid path: -1 none; block path: item[0] = (row, head) or -1
  int slot[kMaxItemsPerWarp];  // this lane's token's slot (0 past the context)
};

template <typename T, int M>
__device__ AttentionPlan plan_attention(const PersistentDecodeParams<T>& p) {
  AttentionPlan a;
  int longest = 0;
#pragma unroll
  for (int m = 0; m < M; ++m) longest = max(longest, __ldg(p.context_lens + m));
  a.parts = max(1, (longest + kMinPartTokens - 1) / kMinPartTokens);
  a.block_path = a.parts <= kConsumerWarps && M * p.H <= int(gridDim.x);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto slot_of = [&](int m, int t) {
    if (t >= __ldg(p.context_lens + m)) return 0;
    return __ldg(p.block_tables + int64_t(m) * p.max_blocks + t / p.block_size) * p.block_size +
           t % p.block_size;
  };
#pragma unroll
  for (int k = 0; k < kMaxItemsPerWarp; ++k) a.item[k] = -1, a.slot[k] = 0;
  if (a.block_path) {
    if (int(blockIdx.x) < M * p.H) {
      a.item[0] = blockIdx.x;
      a.slot[0] = slot_of(blockIdx.x / p.H, warp * kMinPartTokens + lane);
    }
    return a;
  }
  const int items = M * p.H * a.parts;
#pragma unroll
  for (int k = 0; k < kMaxItemsPerWarp; ++k) {
    const int i = blockIdx.x * kConsumerWarps + warp + k * int(gridDim.x) * kConsumerWarps;
    if (i >= items) continue;
    a.item[k] = i;
    a.slot[k] = slot_of(i / (p.H * a.parts), (i % a.parts) * kMinPartTokens + lane);
  }
  return a;
}

// Softmax state of one warp over up to 32 tokens [t0, t0 + n) of row m, head h: max and sum of
// the (log2-domain) scores, and this lane's two output dims unnormalized. n <= 0: empty.
struct TileState {
  float max, sum, acc0, acc1;
};

template <typename T>
__device__ __forceinline__ TileState attend_tile(const PersistentDecodeParams<T>& p,
                                                 const DecodeLayerWeights<T>& w, int m, int h,
                                                 int slot, int n, float* qs) {
  constexpr int V = kVec16<T>;
  const int lane = threadIdx.x % 32, C = p.C;
  const int64_t head = int64_t(h) * kHeadSize;
  const bool valid = lane < n;
  // Every load first (one memory latency): q, this lane's key row, and its two output dims of
  // the value rows. Rows past the context are zeros, not loaded: a weight of 0 times whatever an
  // unwritten slot holds could be NaN.
  const Vec<T, 2> q = load_cg<T, 2>(p.qkv + int64_t(m) * 3 * C + head + 2 * lane);
  Vec<T, V> k[kHeadSize / V];
  if (valid) {
    const T* k_row = w.k_cache + int64_t(slot) * C + head;
#pragma unroll
    for (int j = 0; j < kHeadSize / V; ++j) k[j] = load_cg<T, V>(k_row + j * V);
  }
  Vec<T, 2> v[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int sj = __shfl_sync(0xffffffffu, slot, j);
    v[j].v[0] = v[j].v[1] = from_float<T>(0.f);
    if (j < n) v[j] = load_cg<T, 2>(w.v_cache + int64_t(sj) * C + head + 2 * lane);
  }
  const float q_scale = 1.4426950408889634f / 8.f;  // log2(e) / sqrt(64): scores in log2 units
  qs[2 * lane] = to_float(q.v[0]) * q_scale;
  qs[2 * lane + 1] = to_float(q.v[1]) * q_scale;
  __syncwarp();
  float score = -INFINITY;
  if (valid) {
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kHeadSize / V; ++j) {
#pragma unroll
      for (int e = 0; e < V; ++e) dot += qs[j * V + e] * to_float(k[j].v[e]);
    }
    score = dot;
  }
  __syncwarp();  // qs may be rewritten next
  TileState st;
  st.max = warp_max(score);
  const float prob = valid ? exp2f(score - st.max) : 0.f;
  st.sum = warp_sum(prob);
  st.acc0 = st.acc1 = 0.f;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const float pj = __shfl_sync(0xffffffffu, prob, j);
    st.acc0 += pj * to_float(v[j].v[0]);
    st.acc1 += pj * to_float(v[j].v[1]);
  }
  return st;
}

// Block path: (row, head) item of this block, 8 warps x 32 tokens, merged in shared memory
// (red: [warps, 64] outputs then [warps] max and [warps] sum).
template <typename T>
__device__ void attention_block(const PersistentDecodeParams<T>& p, const DecodeLayerWeights<T>& w,
                                int item, int slot, float* qs, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int m = item / p.H, h = item % p.H;
  const int ctx = __ldg(p.context_lens + m);
  const int n = ctx - warp * kMinPartTokens;
  float* acc = red + warp * kHeadSize;
  float* maxes = red + kConsumerWarps * kHeadSize;
  float* sums = maxes + kConsumerWarps;
  if (n > 0) {
    const TileState st = attend_tile(p, w, m, h, slot, n, qs + warp * kHeadSize);
    acc[2 * lane] = st.acc0, acc[2 * lane + 1] = st.acc1;
    if (lane == 0) maxes[warp] = st.max, sums[warp] = st.sum;
  } else if (lane == 0) {
    maxes[warp] = -INFINITY, sums[warp] = 0.f;
  }
  consumer_sync();
  if (warp == 0) {
    T* out = p.attn + int64_t(m) * p.C + h * kHeadSize + 2 * lane;
    if (ctx <= 0) {  // padding row of a graph bucket
      out[0] = out[1] = from_float<T>(0.f);
    } else {
      float gmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < kConsumerWarps; ++j) gmax = fmaxf(gmax, maxes[j]);
      float total = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
      for (int j = 0; j < kConsumerWarps; ++j) {
        const float wj = maxes[j] == -INFINITY ? 0.f : exp2f(maxes[j] - gmax);
        total += wj * sums[j];
        o0 += wj * red[j * kHeadSize + 2 * lane];
        o1 += wj * red[j * kHeadSize + 2 * lane + 1];
      }
      out[0] = from_float<T>(o0 / total);
      out[1] = from_float<T>(o1 / total);
    }
  }
}

// Grid path: one partition; the last of its (row, head) to finish merges all of them.
template <typename T>
__device__ void attention_item(const PersistentDecodeParams<T>& p, const DecodeLayerWeights<T>& w,
                               int item, int slot, int parts_max, float* qs) {
  const int lane = threadIdx.x % 32, H = p.H;
  const int m = item / (H * parts_max), h = item / parts_max % H, part = item % parts_max;
  const int ctx = __ldg(p.context_lens + m);
  T* out = p.attn + int64_t(m) * p.C + h * kHeadSize + 2 * lane;
  if (ctx <= 0) {  // padding row of a graph bucket
    if (part == 0) out[0] = out[1] = from_float<T>(0.f);
    return;
  }
  const int parts = (ctx + kMinPartTokens - 1) / kMinPartTokens;
  if (part >= parts) return;
  const TileState st = attend_tile(p, w, m, h, slot, ctx - part * kMinPartTokens, qs);
  if (parts == 1) {
    out[0] = from_float<T>(st.acc0 / st.sum);
    out[1] = from_float<T>(st.acc1 / st.sum);
    return;
  }
  // Publish this partition; the last one of (m, h) merges (acquire-release on the counter).
  const PersistentScratch& ws = p.scratch;
  const int64_t first = (int64_t(m) * H + h) * kMaxParts;
  const int64_t row = first + part;
  *reinterpret_cast<float2*>(ws.part_out + row * kHeadSize + 2 * lane) =
      make_float2(st.acc0, st.acc1);
  if (lane == 0) ws.part_max[row] = st.max, ws.part_sum[row] = st.sum;
  __syncwarp();
  unsigned last = 0;
  if (lane == 0) {
    last = atomic_add_acq_rel(&ws.part_counters[m * H + h], 1u) == unsigned(parts - 1);
  }
  if (!__shfl_sync(0xffffffffu, last, 0)) return;
  __syncwarp();
  const float pmax = lane < parts ? __ldcg(ws.part_max + first + lane) : -INFINITY;
  const float psum = lane < parts ? __ldcg(ws.part_sum + first + lane) : 0.f;
  float2 po[kMaxParts];
#pragma unroll
  for (int j = 0; j < kMaxParts; ++j) {
    po[j] = j < parts ? __ldcg(reinterpret_cast<const float2*>(ws.part_out +
                                                               (first + j) * kHeadSize) + lane)
                      : make_float2(0.f, 0.f);
  }
  const float gmax = warp_max(pmax);
  const float weight = lane < parts ? exp2f(pmax - gmax) : 0.f;
  const float total = warp_sum(psum * weight);
  float o0 = 0.f, o1 = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxParts; ++j) {
    const float wj = __shfl_sync(0xffffffffu, weight, j);
    o0 += wj * po[j].x, o1 += wj * po[j].y;
  }
  out[0] = from_float<T>(o0 / total);
  out[1] = from_float<T>(o1 / total);
  if (lane == 0) ws.part_counters[m * H + h] = 0;  // ready for the next layer and launch
}

template <typename T>
__device__ __forceinline__ void attention_stage(const PersistentDecodeParams<T>& p,
                                                const DecodeLayerWeights<T>& w,
                                                const AttentionPlan& a, float* qs, float* red) {
  if (a.block_path) {
    // Uniform per block: blocks past rows x heads have nothing to do.
    if (a.item[0] >= 0) attention_block(p, w, a.item[0], a.slot[0], qs, red);
    return;
  }
#pragma unroll
  for (int k = 0; k < kMaxItemsPerWarp; ++k) {
    if (a.item[k] >= 0) {
      attention_item(p, w, a.item[k], a.slot[k], a.parts, qs + (threadIdx.x / 32) * kHeadSize);
    }
  }
}

// ---- the kernel -----------------------------------------------------------------------------

template <typename T, int M>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_decode_kernel(const PersistentDecodeParams<T> p, int slot_bytes,
                             int bias_segment) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) char smem[];
  const int C = p.C, I = p.I, K_max = max(C, I);
  Ring ring;
  ring.data = smem;
  ring.slot_bytes = slot_bytes;
  float* xs = reinterpret_cast<float*>(smem + size_t(kSlots) * slot_bytes);  // [M, K_max]
  float* ln = xs + M * K_max;                                                   // [2, C]
  float* biases = ln + 2 * C;                                   // [2 parities, 4, bias_segment]
  float* partial = biases + 8 * bias_segment;                                   // [warps, M]
  float* qs = partial + kConsumerWarps * M;                                     // [warps, 64]
  ring.full = reinterpret_cast<uint64_t*>(qs + kConsumerWarps * kHeadSize);     // [kSlots]
  ring.empty = ring.full + kSlots;                                              // [kSlots]
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) {
      mbar_init(&ring.full[s], 1);
      mbar_init(&ring.empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x >= kConsumers) {  // the producer warp: one lane issues every copy
    if (threadIdx.x == kConsumers) produce(p, ring);
    return;
  }

  unsigned chunk = 0, generation = 0;
  unsigned* barrier = p.scratch.barrier;
  // Tuning trace: consumer thread 0's clock at stage boundaries (see PersistentScratch::trace).
  auto mark = [&](int event) {
    if (p.scratch.trace && threadIdx.x == 0) {
      p.scratch.trace[int64_t(blockIdx.x) * (10 * p.L + 2) + event] = clock64();
    }
  };
  mark(0);
  const AttentionPlan plan = plan_attention<T, M>(p);
  prefetch_ln(ln, p.layers[0].ln_1_w, p.layers[0].ln_1_b, C);
  prefetch_biases(p, 0, biases, bias_segment, slot_bytes);
  consumer_sync();
  for (int l = 0; l < p.L; ++l) {
    const DecodeLayerWeights<T>& w = p.layers[l];
    const float* b = biases + (l & 1) * 4 * bias_segment;  // this layer's, by stage segment
    // ln_1 + QKV; K and V of the new token into their cache slots.
    stage_layernorm<T, M>(p, xs, ln, nullptr, M, l == 0);
    consume_gemv<T, M>(gemv_stage(p, l, 0), ring, chunk, xs, partial,
                       [&](int n, int i, int m, float y) {
                         const T v = from_float<T>(y + b[i]);
                         p.qkv[int64_t(m) * 3 * C + n] = v;
                         const int slot = p.slot_mapping[m];
                         if (n >= C && slot >= 0) {
                           T* cache = n < 2 * C ? w.k_cache : w.v_cache;
                           cache[int64_t(slot) * C + (n < 2 * C ? n - C : n - 2 * C)] = v;
                         }
                       });
    mark(10 * l + 1);
    grid_sync(barrier, generation);
    mark(10 * l + 2);
    attention_stage(p, w, plan, qs, xs);
    mark(10 * l + 3);
    grid_sync(barrier, generation);
    mark(10 * l + 4);
    // residual += y + bias (proj and fc_proj), bias: this block's rows of the stage.
    auto add_to_residual = [&](const float* bias) {
      return [&p, C, bias](int n, int i, int m, float y) {
        float* r = p.residual + int64_t(m) * C + n;
        *r = __ldcg(r) + y + bias[i];
      };
    };
    // proj + residual.
    stage_activation<T, M>(xs, p.attn, C);
    consume_gemv<T, M>(gemv_stage(p, l, 1), ring, chunk, xs, partial,
                       add_to_residual(b + bias_segment));
    prefetch_ln(ln, w.ln_2_w, w.ln_2_b, C);
    mark(10 * l + 5);
    grid_sync(barrier, generation);
    mark(10 * l + 6);
    // ln_2 + fc + GELU.
    stage_layernorm<T, M>(p, xs, ln, nullptr, M, false);
    consume_gemv<T, M>(gemv_stage(p, l, 2), ring, chunk, xs, partial,
                       [&](int n, int i, int m, float y) {
                         const float z = y + b[2 * bias_segment + i];
                         p.mlp[int64_t(m) * I + n] = from_float<T>(gelu_tanh(z));
                       });
    mark(10 * l + 7);
    grid_sync(barrier, generation);
    mark(10 * l + 8);
    // fc_proj + residual.
    stage_activation<T, M>(xs, p.mlp, I);
    consume_gemv<T, M>(gemv_stage(p, l, 3), ring, chunk, xs, partial,
                       add_to_residual(b + 3 * bias_segment));
    // The next layer's LayerNorm parameters and biases load while the barrier waits.
    if (l + 1 < p.L) {
      prefetch_ln(ln, p.layers[l + 1].ln_1_w, p.layers[l + 1].ln_1_b, C);
      prefetch_biases(p, l + 1, biases + ((l + 1) & 1) * 4 * bias_segment, bias_segment,
                      slot_bytes);
    } else {
      prefetch_ln(ln, p.ln_f_w, p.ln_f_b, C);
    }
    mark(10 * l + 9);
    grid_sync(barrier, generation);
    mark(10 * l + 10);
  }
  // ln_f + LM head over the logits rows.
  stage_layernorm<T, M>(p, xs, ln, p.logits_indices, p.num_logits, false);
  consume_gemv<T, M>(gemv_stage(p, p.L, 0), ring, chunk, xs, partial,
                     [&](int n, int, int m, float y) {
                       if (m < p.num_logits) p.logits[int64_t(m) * p.V + n] = y;
                     });
  mark(10 * p.L + 1);
  // Every block has passed every barrier: the last one out leaves the words at zero.
  if (threadIdx.x == 0 && atomicAdd(&barrier[kExited], 1u) == gridDim.x - 1) {
    barrier[kArrived] = 0;
    barrier[kExited] = 0;
  }
#else
  __trap();  // never launched below sm_90 (persistent_decode_supported)
#endif
}

// ---- host side ------------------------------------------------------------------------------

struct Launch {
  size_t smem = 0;
  int slot_bytes = 0, bias_segment = 0;  // slot_bytes 0: does not fit
};

// Shared memory: the ring takes what the activations leave.
Launch plan(int C, int I, int rows, int elem_size, int num_sms, int smem_limit) {
  Launch s;
  const int K_max = std::max(C, I);
  s.bias_segment = (std::max(3 * C, I) + num_sms - 1) / num_sms + 1;
  const size_t fixed = size_t(rows) * K_max * 4 + size_t(2) * C * 4 +
                       size_t(8) * s.bias_segment * 4 + size_t(kConsumerWarps) * rows * 4 +
                       size_t(kConsumerWarps) * kHeadSize * 4 + 2 * kSlots * 8;
  const int64_t budget = int64_t(smem_limit) - int64_t(fixed) - 128;
  s.slot_bytes = int(std::max<int64_t>(budget, 0) / kSlots / 128 * 128);
  if (s.slot_bytes < int64_t(K_max) * elem_size) return Launch{};  // a row must fit a slot
  s.smem = size_t(kSlots) * s.slot_bytes + fixed;
  return s;
}

int smem_optin(int device) {
  int bytes = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

template <typename T, int M>
void launch_rows(const PersistentDecodeParams<T>& p, cudaStream_t stream) {
  int device = 0, num_sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  const Launch s = plan(p.C, p.I, M, int(sizeof(T)), num_sms, smem_optin(device));
  if (s.slot_bytes == 0) throw std::invalid_argument("persistent decode: model too wide");
  auto kernel = persistent_decode_kernel<T, M>;
  allow_dynamic_smem(kernel, smem_optin(device));  // the same for every model in the process
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(num_sms);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = s.smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // every block resident: barriers are safe
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, s.slot_bytes, s.bias_segment));
}

}  // namespace

bool persistent_decode_supported(int C, int I, int H, int max_positions, int elem_size,
                                 int device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return false;
  if (prop.major < 9 || !prop.cooperativeLaunch) return false;
  if (H < 1 || C != H * kHeadSize) return false;
  // Attention items: 32 tokens each, at most kMaxParts per (row, head), kMaxItemsPerWarp per warp.
  if (max_positions > kMaxParts * kMinPartTokens) return false;
  if (kPersistentMaxRows * H * kMaxParts >
      kMaxItemsPerWarp * kConsumerWarps * prop.multiProcessorCount) {
    return false;
  }
  const int vec = 16 / elem_size;
  if (C % vec != 0 || I % vec != 0) return false;
  return plan(C, I, kPersistentMaxRows, elem_size, prop.multiProcessorCount, smem_optin(device))
             .slot_bytes > 0;
}

template <typename T>
void launch_persistent_decode(const PersistentDecodeParams<T>& p, int rows, cudaStream_t stream) {
  switch (rows) {
    case 1: return launch_rows<T, 1>(p, stream);
    case 2: return launch_rows<T, 2>(p, stream);
    default:
      throw std::invalid_argument("persistent decode: " + std::to_string(rows) +
                                  " rows, at most " + std::to_string(kPersistentMaxRows));
  }
}

template void launch_persistent_decode<float>(const PersistentDecodeParams<float>&, int,
                                              cudaStream_t);
template void launch_persistent_decode<__half>(const PersistentDecodeParams<__half>&, int,
                                               cudaStream_t);
template void launch_persistent_decode<__nv_bfloat16>(const PersistentDecodeParams<__nv_bfloat16>&,
                                                      int, cudaStream_t);

}  // namespace pagedgpt2::cuda

// Skinny GEMM kernels (see skinny_gemm.cuh for what is fused).
//
// Block = 8 warps. Each output column n (a row of W) is owned by `warps_per_row` warps that split
// K; a warp reads W[n, :] in 16-byte vectors (lane-contiguous, so a warp-load is 512 coalesced
// bytes) and multiplies it with the M staged rows of x held in shared memory as float32.
// NOTE: warps_per_row is picked per launch so that there are >= 2 blocks per SM: N=768 layers
// (proj, fc_proj) split K over 4 warps, N >= 2304 use one warp per output.
// NOTE: at one row, gpt2's and gpt2-medium's layer GEMVs run resident variants instead: one
// block an SM, all of its weights in registers before pdl_wait (see skinny_gemm_kernel).
// NOTE: the first batch of weight loads is issued before x is staged, so the DRAM latency of W
// overlaps x's copy. The grid never exceeds what is resident at once: blocks loop
// over row groups (x staged once per block, no second wave waiting to start its loads).
// NOTE: the blocks also ask L2 for p.prefetch (a few MB of the next GEMVs' weights, see
// l2_ahead in cuda_model.cu) before they wait: the next kernel's first loads then hit L2.
// NOTE: at batch 1 a GEMV is a chain of dependent memory round trips, and only those after
// pdl_wait are on the step's critical path. So everything that does not depend on the kernel
// before (the LayerNorm weight, into shared memory; each row's bias or LayerNorm fold) is
// loaded before the wait, and what does (the residual row it adds to, the QKV's cache slots)
// is loaded right after it, beside x, instead of in the epilogue.
#include <algorithm>
#include <iterator>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/cuda_common.cuh"
#include "cuda/sampling.cuh"
#include "cuda/skinny_gemm.cuh"
#include "cuda/stage_trace.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte weight vectors in flight per lane
// NOTE: the weights stream one chunk (kUnroll vectors a lane) ahead, in registers. A ring of 2-4
// chunks a warp in shared memory (cp.async, filled before pdl_wait, across row groups) was
// slower on an H200 (gpt2 batch 1 0.230 -> 0.247-0.250 ms, gpt2-xl 1.684 -> 1.734-1.931):
// the big GEMVs do not lack bytes in flight (notes.md, twenty-fourth session).
constexpr int kMinBlocksPerSm = 3;  // register cap: 3 x 8 warps keep ~100 KB of W in flight
// NOTE: 4-warp blocks, 7 an SM (72 registers, 28 warps an SM) were slower everywhere on an H200
// (gpt2 batch 1 0.313 -> 0.380 ms a step, gpt2-xl 2.06 -> 2.68; spills at 1 row). notes.md,
// fifteenth session.
constexpr size_t kMaxSmem = 100 * 1024 + kWarps * kSkinnyMaxRows * 4;  // x and the partials
// ... and the LayerNorm parameters too: under the 163 KB a block may ask for on sm_80 (227 on
// sm_90).
constexpr size_t kMaxSmemWithLayerNorm = 160 * 1024;

int padded_rows(int rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

// x [m_tile, K], with a LayerNorm its weight [K] (both read as float4: K % 8 == 0 keeps them
// 16-byte aligned), the partial sums [kWarps, m_tile], the rows' cache slots [m_tile] and, with
// a LayerNorm, the rows' statistics (ln_row_stats) [kWarps, m_tile, 2].
size_t smem_bytes(int m_tile, int K, bool layernorm) {
  return (size_t(m_tile) * K + (kWarps + 1) * m_tile +
          (layernorm ? 2 * kWarps * m_tile + size_t(K) : 0)) * 4;
}

// Copies the LayerNorm weight into shared memory (all threads; the caller syncs).
__device__ __forceinline__ void stage_ln_weight(float* w, const float* ln_weight, int K) {
  for (int k = threadIdx.x; k < K; k += kThreads) w[k] = ln_weight[k];
}

// Copies the M rows of vecs_per_row 16-byte vectors each with all threads: load(m, c) reads
// vector c of row m (raw bytes), store(m, i, v) writes vector i = m * vecs_per_row + c.
// kStageBatch loads a thread are in flight before their stores, so a block copies its x in one
// round trip to L2 (a few at most) instead of one per vector a thread.
// NOTE: measured (H200, tools/trace_gemv.py): copying x one vector at a time took 0.7 us a
// round trip, 2 round trips at gpt2's fc_proj (K 3,072) and 4 at gpt2-xl's (K 6,400).
// NOTE: after pdl_wait every instruction is on the step's critical path, and a warp's are
// dependent: the row of vector i is found by M - 1 compares, not by a division (an integer
// division by a runtime value is ~40 dependent instructions, once per vector). Loads stay raw
// (uint4) until stored: a Vec<__half, 8> was repacked register by register right after its
// load, so each load waited for the one before. With the two-pass LayerNorm's loops unrolled
// and 1/K from the host, this cut the 1-row kernels' code after the wait by ~40% and gpt2's
// batch-1 step from 0.288 to 0.252 ms (gpt2-xl 1.93 -> 1.68; H200, notes.md, twenty-first
// session).
constexpr int kStageBatch = 4;
template <int M, typename Load, typename Store>
__device__ __forceinline__ void stage_vectors(int vecs_per_row, Load load, Store store) {
  const int n_vecs = M * vecs_per_row;
  for (int base = threadIdx.x; base < n_vecs; base += kStageBatch * kThreads) {
    auto row_of_vector = [&](int i) {
      int m = 0;
#pragma unroll
      for (int r = 1; r < M; ++r) m += i >= r * vecs_per_row;
      return m;
    };
    uint4 v[kStageBatch];
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      const int i = base + j * kThreads;
      // NOTE: row_of_vector(i) twice, on purpose: a local for it made ptxas spill 4 bytes in
      // the 2-row LayerNorm LM head (fp16, bf16; 0 before) and more in the 8-row variants.
      if (i < n_vecs) v[j] = load(row_of_vector(i), i - row_of_vector(i) * vecs_per_row);
    }
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      const int i = base + j * kThreads;
      if (i < n_vecs) store(row_of_vector(i), i, v[j]);
    }
  }
}

// LayerNorm folded into the GEMV (see SkinnyParams::ln_fold): x - x0 (x0: the row's first
// element) is staged times the weight, and each thread sums x - x0 and its square over the
// vectors it stages; stats holds the warps' sums [kWarps, M, 2]. After the block syncs,
// ln_row_stats gives a row's mean - x0 and 1 / std for the epilogue:
// y = rstd * (dot - (mean - x0) * s) + c, dot being the staged row's product with W's row.
// NOTE: the LayerNorm before the multiply cost two block sums (4 barriers) and a pass over x
// after the wait (H200, gpt2 batch 1: QKV's x staged 1.5 us after the wait, a plain x 0.8).
// Now nothing but x's copy lies between the wait and the multiply. Everything is about x0, not
// 0: neither E[d^2] - E[d]^2 nor dot - (mean - x0) * s cancels when a row's mean is large
// beside its spread (a kernel test has rows at 1,000 +- 1).
template <int M>
__device__ __forceinline__ void ln_warp_stats(float* stats, const float (&sum)[M],
                                              const float (&sq)[M]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = warp_sum(sum[m]), q = warp_sum(sq[m]);
    if (lane == 0) stats[(warp * M + m) * 2] = s, stats[(warp * M + m) * 2 + 1] = q;
  }
}

// Row m's mean - x0 and 1 / sqrt(var + eps) from stats (after the block synced).
__device__ __forceinline__ float2 ln_row_stats(const float* stats, int M, int m, float inv_k,
                                               float eps) {
  float s = 0.f, q = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += stats[(w * M + m) * 2], q += stats[(w * M + m) * 2 + 1];
  const float d = s * inv_k;
  return make_float2(d, rsqrtf(fmaxf(q * inv_k - d * d, 0.f) + eps));
}

// Split order (below): where half q (elements 0-3 or 4-7) of 8-element vector j of a staged
// row lies, in float4s from the row's start. The staging (x_slot) and the multiplies' reads
// both go through it.
__device__ __forceinline__ int x_half(int j, int q, int K) { return q * (K / 8) + j; }

// Where float4 i of the staged rows (elements 4 i .. 4 i + 3 over all rows; i of row m) lies in
// shared memory: in order, or (kSplit, 8-element vectors) each row's first halves of every
// vector and then its second halves, so that a warp's load of one half of 32 consecutive
// vectors reads 512 contiguous bytes (4 shared-memory wavefronts) instead of 16 bytes of every
// 32 (8).
// NOTE: the one- and two-row kernels of a 16-bit type stage x split (kSplitX). Measured on an
// H200 (bench_env.py; notes.md, thirty-first and thirty-second sessions): the resident
// variants, gpt2 batch 1 4,854 / 4,877 -> 5,091 / 5,072 tok/s, gpt2-medium 2,211 / 2,202 ->
// 2,342 / 2,348; the one-row streaming kernel, gpt2-xl batch 1 605 -> 638 (1.653 -> 1.567 ms);
// two rows, gpt2 batch 2 6,544 / 6,526 -> 7,062 / 7,072, gpt2-xl batch 2 851 / 849 -> 985 / 982
// (one process, both kernels built). The 4- and 8-row kernels keep x in order: with the split
// index they compiled to other register allocations and spills (ptxas -v), not measured.
template <bool kSplit>
__device__ __forceinline__ int x_slot(int i, int m, int K) {
  const int c = i - m * (K / 4);  // within the row
  return kSplit ? m * (K / 4) + x_half(c >> 1, c & 1, K) : i;
}

// Partitions whose loads stage_attention issues together (8: spills at 1-2 rows).
constexpr int kPartsAtOnce = 4;

// kAttentionPartials: x row m = sequence m's attention output, from its parts[m] partitions
// (see DecodeWorkspace): element d of head h is sum_p w_p o_p[d] / sum_p w_p l_p, w_p =
// exp2(max_p - max over p): merge_partials, the attention kernel's own merge.
// A row with no partition (padding, or m >= p.rows) is zero. The engine takes this path only
// where a thread stages one vector (skinny_merges_attention, check_partials).
// NOTE: this is the attention kernel's last step moved here. There, the last partition of a
// head to finish merged them: its partial row, a fence, an atomic on the head's counter and
// then the others' partials, three dependent round trips to L2 on the batch-1 step's critical
// path. Here the loads take the place of x's copy.
// NOTE: ptxas issues the maxima's loads first and the rest after their exp2 (two round trips,
// read in the SASS). Copying all of them into shared memory with cp.async instead (one round
// trip, planned before the wait) made the step slower: gpt2 batch 1 0.228-0.230 -> 0.239 ms
// (H200, notes.md, twenty-third session).
template <typename T, int M, bool kSplit>
__device__ __forceinline__ void stage_attention(float* xs, const SkinnyParams<T>& p,
                                                const int (&parts)[M], int K) {
  const DecodeWorkspace& ws = p.partials;
  const int D = p.head_size, H = K / D, vecs = K / 4;  // float4 vectors a row
  for (int i = threadIdx.x; i < M * vecs; i += kThreads) {
    int m = 0, n = parts[0];
#pragma unroll
    for (int r = 1; r < M; ++r) {
      if (i >= r * vecs) m = r, n = parts[r];
    }
    const int k = (i - m * vecs) * 4, h = k / D;
    float o[4];
    const float l = merge_partials<4, kPartsAtOnce>(ws, (int64_t(m) * H + h) * p.max_partitions,
                                                    n, D, k - h * D, o);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    reinterpret_cast<float4*>(xs)[x_slot<kSplit>(i, m, K)] =
        make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
  }
}

// x staged into xs [M, K] as float32, rows m >= p.rows zero; with kLayerNorm, x - x0 times ln_w
// (the LayerNorm weight in shared memory), and the rows' statistics into stats (ln_warp_stats);
// with kAttentionPartials, the partitions merged (parts: each row's count); kSplit (rows of
// 8-element vectors): in x_slot's split order; K: p.K (a constant in variants built for it).
// The caller syncs.
template <typename T, int M, SkinnyInput IN, bool kSplit = false>
__device__ __forceinline__ void stage_x(float* xs, float* stats, const SkinnyParams<T>& p,
                                        const float* ln_w, const int (&parts)[M],
                                        int K) {
  auto row_of = [&](int m) { return int64_t(p.x_rows ? p.x_rows[m] : m); };
  if constexpr (IN == SkinnyInput::kLayerNorm) {
    // x is the float32 residual stream; K % 8 == 0 (skinny_gemm_supported).
    const float* x = static_cast<const float*>(p.x);
    float x0[M];
#pragma unroll
    for (int m = 0; m < M; ++m) x0[m] = m < p.rows ? x[row_of(m) * K] : 0.f;
    float sum[M] = {}, sq[M] = {};
    stage_vectors<M>(
        K / 4,
        [&](int m, int c) {
          return m < p.rows ? reinterpret_cast<const uint4*>(x + row_of(m) * K)[c]
                            : make_uint4(0, 0, 0, 0);
        },
        [&](int m, int i, const uint4& v) {
          const float4 f = make_float4(__uint_as_float(v.x), __uint_as_float(v.y),
                                       __uint_as_float(v.z), __uint_as_float(v.w));
#pragma unroll
          for (int r = 0; r < M; ++r) {
            if (r != m) continue;
            const float a = f.x - x0[r], b = f.y - x0[r], c = f.z - x0[r], d = f.w - x0[r];
            sum[r] += (a + b) + (c + d);
            sq[r] += (a * a + b * b) + (c * c + d * d);
            const float4 g = reinterpret_cast<const float4*>(ln_w)[i - m * (K / 4)];
            reinterpret_cast<float4*>(xs)[x_slot<kSplit>(i, m, K)] =
                make_float4(a * g.x, b * g.y, c * g.z, d * g.w);
          }
        });
    ln_warp_stats<M>(stats, sum, sq);
  } else if constexpr (IN == SkinnyInput::kAttentionPartials) {
    stage_attention<T, M, kSplit>(xs, p, parts, K);
  } else {
    constexpr int V = kVec16<T>;
    const T* x = static_cast<const T*>(p.x);
    stage_vectors<M>(
        K / V,
        [&](int m, int c) {
          return m < p.rows ? reinterpret_cast<const uint4*>(x + row_of(m) * K)[c]
                            : make_uint4(0, 0, 0, 0);  // zero bits: 0.0 in every T
        },
        [&](int m, int i, const uint4& v) {
          float f[V];
          unpack16<T>(v, f);
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            reinterpret_cast<float4*>(xs)[x_slot<kSplit>(i * (V / 4) + q, m, K)] =
                make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
          }
        });
  }
}

// What the epilogue of output (m, n) adds, loaded ahead of it: the bias (with a LayerNorm, c
// and s of its fold) before the wait, and the residual value after it.
struct EpilogueInputs {
  float bias = 0.f;
  float ln_sum = 0.f;
  float residual = 0.f;
};

// Rows a warp takes at once. The LM head's rows are short (gpt2: 1.5 KB, three vectors a lane)
// and many (16 row groups a block), so at 1-2 rows a warp reads 4 consecutive rows as one run
// of 4 * K: its second batch of vectors in flight is no longer past the end of its row.
// NOTE: measured (H200): gpt2 0.331 -> 0.322 ms a step at batch 1, 0.397 -> 0.375 at batch 2;
// gpt2-xl batch 2 2.83 -> 2.71 ms, batch 1 unchanged. 8 rows a warp at 1 row (six chunks a
// run, so the drain at its end is a sixth of it, not a third; no spills) changed nothing: gpt2
// batch 1 4,446-4,450 against 4,442-4,460 tok/s, gpt2-xl 606-607 against 604-608 (H200, two
// processes of each build, alternating; notes.md, twenty-fifth session).
template <int M, SkinnyOutput OUT>
constexpr int kRowsPerWarp = OUT == SkinnyOutput::kLogits && M <= 2 ? 4 : 1;

// slot: the cache slot of row m (kBiasQkv), copied into shared memory beside x. Returns the
// output before any activation (kLogits: the logit written).
template <typename T, SkinnyOutput OUT>
__device__ __forceinline__ float epilogue(const SkinnyParams<T>& p, int m, int n, float y,
                                          const EpilogueInputs& in, int32_t slot) {
  const int64_t o = int64_t(m) * p.N + n;
  y += in.bias;  // 0 for logits without a LayerNorm
  if constexpr (OUT == SkinnyOutput::kLogits) {
    static_cast<float*>(p.out)[o] = y;
  } else {
    if constexpr (OUT == SkinnyOutput::kBiasResidual) {
      static_cast<float*>(p.out)[o] = in.residual + y;
    } else if constexpr (OUT == SkinnyOutput::kBiasGelu) {
      static_cast<T*>(p.out)[o] = from_float<T>(gelu_tanh(y));
    } else {
      const T v = from_float<T>(y);
      static_cast<T*>(p.out)[o] = v;
      if constexpr (OUT == SkinnyOutput::kBiasQkv) {
        const int C = p.N / 3;
        if (n >= C && slot >= 0) {
          T* cache = n < 2 * C ? p.k_cache : p.v_cache;
          cache[int64_t(slot) * C + (n < 2 * C ? n - C : n - 2 * C)] = v;
        }
      }
    }
  }
  return y;
}

// SkinnyParams::argmax, reduced in three steps so that nothing is held in registers across the
// multiply: in each row group the writer lanes' keys are reduced over the warp and merged into
// the block's keys in shared memory (argmax_merge); at the end the block makes one atomicMax a
// row (argmax_publish). NOTE: per block, not per warp: same-address atomics queue at L2 one at a
// time (the gpt2 LM head has 396 blocks of 8 warps), and a key held across the loop made ptxas
// spill the 2-row LayerNorm LM head (16 bytes in fp16).
template <int M>
__device__ __forceinline__ unsigned long long* argmax_block_keys() {
  __shared__ unsigned long long keys[M];  // [M], zeroed before the first group
  return keys;
}

// key: 0, or make_key of the logit this lane wrote, of product row lane % M; the writer lanes
// are lanes < M * R (R rows a warp). All lanes.
template <int M, int R>
__device__ __forceinline__ void argmax_merge(unsigned long long key) {
#pragma unroll
  for (int offset = M * R / 2; offset >= M; offset >>= 1) {
    key = max(key, __shfl_xor_sync(0xffffffffu, key, offset));
  }
  const int lane = threadIdx.x % 32;
  if (lane < M && key) atomicMax(&argmax_block_keys<M>()[lane], key);
}

template <int M>
__device__ __forceinline__ void argmax_publish(unsigned long long* keys) {  // all threads
  __syncthreads();
  const unsigned long long key = threadIdx.x < M ? argmax_block_keys<M>()[threadIdx.x] : 0;
  if (key) atomicMax(&keys[threadIdx.x], key);
}

// kArgmax (kLogits only): p.argmax is reduced (a variant of its own: the 2-row LayerNorm LM
// head spilled with it, and an unused argmax should cost nothing).
// Resident variants (RESIDENT > 0, one row): at most one block an SM, RESIDENT rows a warp (one
// warp a row), rows of exactly 32 VPR vectors, and every weight vector of the block loaded into
// registers before pdl_wait (RESIDENT x VPR a lane). A block takes at most half an SM's
// registers, so the next kernel's blocks are resident beside it, loading their own weights.
// NOTE: the streaming kernel's 3 blocks an SM fill the register file: the next kernel's blocks
// start only as this one's leave, and their pdl_wait lets go ~2 us after its end. Resident, they
// pass it 0.8 us after (the bare hand-over), with their weights already in. Measured on an H200
// (tools/trace_gemv.py, gpt2, us after the GEMV before ends): QKV ends 4.13 -> 2.98, fc 3.94 ->
// 2.72; proj (attention inside) and fc_proj unchanged at 5.6 and 3.7. Step (bench_env.py, one
// process): gpt2 batch 1 0.226 -> 0.203 ms, gpt2-medium 0.568 -> 0.460 (notes.md, thirtieth
// session). The fourteenth session's version (weights through shared memory by bulk copies)
// and the twenty-first's (one block an SM, later row groups streamed after the wait) were slower.
// WPR > 0: built for WPR warps a row, as the resident variants are for 1 (wpr_arg, the launch's
// count, is then that); 0: any count, wpr_arg's.
template <typename T, int M, SkinnyInput IN, SkinnyOutput OUT, bool kArgmax = false,
          int RESIDENT = 0, int VPR = 0, int WPR = 0>
__global__ void __launch_bounds__(kThreads, RESIDENT ? 2 : kMinBlocksPerSm)
    skinny_gemm_kernel(const SkinnyParams<T> p, int wpr_arg, float inv_k) {
  extern __shared__ float smem[];
  // The resident variants are built for their row length too (32 * VPR 16-byte vectors).
  const int K = RESIDENT > 0 ? 32 * VPR * kVec16<T> : p.K;
  constexpr bool kLn = IN == SkinnyInput::kLayerNorm;
  float* xs = smem;                              // [M, K]
  float* ln_w = xs + M * K;                      // [K] (kLayerNorm)
  float* partial = ln_w + (kLn ? K : 0);         // [kWarps, M]
  int32_t* slots = reinterpret_cast<int32_t*>(partial + kWarps * M);  // [M] (kBiasQkv)
  float* ln_stats = partial + (kWarps + 1) * M;  // [kWarps, M, 2] (kLayerNorm)
  constexpr int V = kVec16<T>;
  constexpr bool kResident = RESIDENT > 0;
  // > 1: warps_per_row is 1 (and for logits no bias or residual)
  constexpr int R = kResident ? RESIDENT : kRowsPerWarp<M, OUT>;
  static_assert(R == 1 || OUT == SkinnyOutput::kLogits || kResident,
                "several rows a warp: logits or resident variants only");
  constexpr int U = kResident ? RESIDENT * VPR : kUnroll;  // weight vectors a lane in registers
  constexpr bool kSplitX = M <= 2 && V == 8;  // x staged split (x_slot), row by row
  // (the resident multiply reads one row of x, in the split order)
  static_assert(!kResident || (M == 1 && kSplitX), "resident variants: batch 1, 16-bit types");
  static_assert(!kArgmax || OUT == SkinnyOutput::kLogits, "greedy keys of logits only");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kWpr = kResident ? 1 : WPR;
  const int warps_per_row = kWpr > 0 ? kWpr : wpr_arg;
  const int rows_per_block = kWarps / warps_per_row * R;
  const int num_groups = (p.N + rows_per_block - 1) / rows_per_block;
  const int kslice = warp % warps_per_row;
  const int num_vecs = K / V;
  const int stride = warps_per_row * 32;
  // The first of the R rows this warp takes in `group`, and the vectors of their run.
  auto row_of = [&](int group) { return group * rows_per_block + warp / warps_per_row * R; };
  auto run_vecs = [&](int n) { return n < p.N ? min(R, p.N - n) * num_vecs : 0; };
  // The first kUnroll vectors this lane reads of the rows it takes in `group`.
  auto load_first = [&](int group, uint4 (&w)[U]) {
    const int n = row_of(group);
    const int run = run_vecs(n);
    const T* w_row = p.weight + int64_t(n) * K;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = kslice * 32 + lane + u * stride;
      if (idx < run) w[u] = reinterpret_cast<const uint4*>(w_row)[idx];
    }
  };

  // The lanes that write outputs: lane r * M + m (m < rows) of each row's first warp writes
  // product row m of its r-th row.
  const bool writer = kslice == 0 && lane < M * R && lane % M < p.rows;
  auto load_bias = [&](int group, EpilogueInputs& in) {
    const int n = row_of(group) + lane / M;  // this writer's row
    if constexpr (kLn) {
      if (writer && n < p.N) in.ln_sum = p.ln_fold[n], in.bias = p.ln_fold[p.N + n];
    } else if constexpr (OUT != SkinnyOutput::kLogits) {
      if (writer && n < p.N) in.bias = to_float(p.bias[n]);
    }
  };
  auto load_residual = [&](int group, EpilogueInputs& in) {  // after pdl_wait
    const int n = row_of(group) + lane / M;  // this writer's row
    if constexpr (OUT == SkinnyOutput::kBiasResidual) {
      if (writer && n < p.N) {
        in.residual = static_cast<const float*>(p.out)[int64_t(lane % M) * p.N + n];
      }
    }
  };

  StageTrace trace;  // opt-in (PAGEDGPT2_TRACE); nothing otherwise
  pdl_launch_dependents();
  uint4 w[U];  // raw weight vectors
  if constexpr (kResident) {
    // w[r * VPR + v]: vector lane + 32 v of row n + r (rows past N read row N - 1, not written)
    const int n = row_of(blockIdx.x);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const T* row = p.weight + int64_t(min(n + r, p.N - 1)) * K;
      const uint4* w_row = reinterpret_cast<const uint4*>(row);
#pragma unroll
      for (int v = 0; v < VPR; ++v) w[r * VPR + v] = w_row[lane + 32 * v];
    }
  } else {
    load_first(blockIdx.x, w);
  }
  EpilogueInputs in;
  load_bias(blockIdx.x, in);
  int parts[M] = {};  // kAttentionPartials: the rows' partitions (context lengths: step inputs)
  if constexpr (IN == SkinnyInput::kAttentionPartials) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int ctx = m < p.rows ? max(p.context_lens[m], 0) : 0;
      parts[m] = (ctx + p.partition_size - 1) / p.partition_size;
    }
  }
  if constexpr (kLn) stage_ln_weight(ln_w, p.ln_weight, K);
  // NOTE: each block asking L2 here for the bytes it reads after the wait as well (its first
  // group's rows past the first chunk, and up to two later groups) was slower on an H200:
  // gpt2-xl batch 1 0.95-0.96, batch 2 0.94-0.96, gpt2-large 0.98-0.99 (branch
  // experiment/own-prefetch; notes.md, thirty-fourth session).
  prefetch_l2_share(p.prefetch);
  if constexpr (kLn) __syncthreads();  // ln_w staged
  pdl_wait();  // x and the outputs belong to earlier kernels: nothing before this touches them
  trace.mark(1);
  load_residual(blockIdx.x, in);
  // NOTE: the rows' cache slots are copied into shared memory beside x (cp.async: no register).
  // Held in a register across the (then two-pass) LayerNorm, the slot was spilled, and the
  // spill's store waited for the slot's load before x's loads went out: two round trips to L2
  // instead of one.
  if constexpr (OUT == SkinnyOutput::kBiasQkv) {
    if (threadIdx.x < p.rows) cp_async4(&slots[threadIdx.x], &p.slot_mapping[threadIdx.x]);
    cp_async_commit();
  }
  if constexpr (kArgmax) {
    if (threadIdx.x < M) argmax_block_keys<M>()[threadIdx.x] = 0;
  }
  stage_x<T, M, IN, kSplitX>(xs, ln_stats, p, ln_w, parts, K);
  if constexpr (OUT == SkinnyOutput::kBiasQkv) cp_async_wait<0>();
  __syncthreads();
  trace.mark(2);

  // NOTE: the grid is at most what fits on the GPU at once; a block takes row groups
  // blockIdx.x, + gridDim.x, ... so x is staged once per block, and the next group's first
  // weights are in flight while a row is reduced and written.
  for (int group = blockIdx.x; group < num_groups; group += gridDim.x) {
    const int n = row_of(group);
    const bool active = n < p.N;
    const int run = run_vecs(n);
    const T* w_row = p.weight + int64_t(active ? n : 0) * K;
    float acc[M * R];  // [m * R + r]
#pragma unroll
    for (int i = 0; i < M * R; ++i) acc[i] = 0.f;
    // The vectors of chunk `base` (warp-uniform: lane l takes base + l + u * stride).
    auto load_chunk = [&](uint4 (&wv)[U], int base) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + lane + u * stride;
        if (idx < run) wv[u] = reinterpret_cast<const uint4*>(w_row)[idx];
      }
    };
    auto multiply_chunk = [&](const uint4 (&wv)[U], int base) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + lane + u * stride;
        if (idx < run) {
          int r = 0;  // which of the warp's rows vector idx belongs to
#pragma unroll
          for (int j = 1; j < R; ++j) r += idx >= j * num_vecs;
          const int k = (idx - r * num_vecs) * V;
          float wf[V];
          unpack16<T>(wv[u], wf);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const float* x_row = xs + m * K;
            float dot = 0.f;
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {
              // float4 q of x's vector k / V, where stage_x put it
              const float4 x4 = kSplitX
                                    ? reinterpret_cast<const float4*>(x_row)[x_half(k / V, q, K)]
                                    : reinterpret_cast<const float4*>(x_row + k)[q];
              dot += wf[4 * q] * x4.x + wf[4 * q + 1] * x4.y + wf[4 * q + 2] * x4.z +
                     wf[4 * q + 3] * x4.w;
            }
#pragma unroll
            for (int j = 0; j < R; ++j) acc[m * R + j] += j == r ? dot : 0.f;
          }
        }
      }
    };
    // w holds the first chunk (loaded before the wait); the next chunk's loads go out before a
    // chunk is multiplied. NOTE: at 1-2 rows the two buffers take turns, so neither is copied
    // into the other (the copies were ~80 moves a warp after the wait: gpt2 batch 1 0.253 ->
    // 0.248 ms, H200); at 4-8 rows that made ptxas spill, so those copy.
    if constexpr (kResident) {
      // x's vector v is read once for the R rows (the same columns of each): no guard, no
      // row lookup (a first version read x per row behind the streaming loop's guards and
      // gained nothing at gpt2). acc[r] sums a row's vectors in the streaming kernel's order.
#pragma unroll
      for (int v = 0; v < VPR; ++v) {
        float4 x4[V / 4];
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          x4[q] = reinterpret_cast<const float4*>(xs)[x_half(lane + 32 * v, q, K)];
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[V];
          unpack16<T>(w[r * VPR + v], wf);
          float dot = 0.f;
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            dot += wf[4 * q] * x4[q].x + wf[4 * q + 1] * x4[q].y + wf[4 * q + 2] * x4[q].z +
                   wf[4 * q + 3] * x4[q].w;
          }
          acc[r] += dot;
        }
      }
    } else if (active) {
      const int chunk = kUnroll * stride;
      uint4 other[kUnroll];
      for (int base = kslice * 32; base < run; base += (M <= 2 ? 2 : 1) * chunk) {
        load_chunk(other, base + chunk);
        multiply_chunk(w, base);
        if constexpr (M <= 2) {
          if (base + chunk >= run) break;
          load_chunk(w, base + 2 * chunk);
          multiply_chunk(other, base + chunk);
        } else {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) w[u] = other[u];
        }
      }
    }
    if (group == int(blockIdx.x)) trace.mark_after(3, acc[0]);
    // The next group's first weights, bias and residual go out before this one is reduced.
    // (a resident grid has a block a group, and one warp a row)
    // NOTE: the resident variants compiled this and the K split's sum, never taken, until the
    // thirty-fourth session: 10-25% of their instructions. Without them (H200, bench_env.py,
    // batch 1, two builds in alternating processes): gpt2 5,125 / 5,165 -> 5,444 / 5,459 tok/s,
    // gpt2-medium 2,354 / 2,351 -> 2,510 / 2,512.
    EpilogueInputs next_in = in;
    if (!kResident && group + int(gridDim.x) < num_groups) {
      load_first(group + gridDim.x, w);
      load_bias(group + gridDim.x, next_in);
      load_residual(group + gridDim.x, next_in);
    }
#pragma unroll
    for (int i = 0; i < M * R; ++i) acc[i] = warp_sum(acc[i]);

    if (R == 1 && warps_per_row > 1) {  // (resident: built for one warp a row)
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) partial[warp * M + m] = acc[m];
      }
      __syncthreads();
      if (kslice == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float s = 0.f;
          for (int j = 0; j < warps_per_row; ++j) s += partial[(warp + j) * M + m];
          acc[m] = s;
        }
      }
      __syncthreads();  // partial is rewritten by the next group
    }
    const int m = lane % M, r = lane / M;
    unsigned long long key = 0;  // kArgmax: make_key of this lane's logit
    if (writer && n + r < p.N) {
      float y = 0.f;
#pragma unroll
      for (int i = 0; i < M * R; ++i) {
        if (i == m * R + r) y = acc[i];
      }
      // NOTE: recomputed each row group though m = lane % M never changes: computed once after
      // x is staged and held across the loop, it made the 2-row LayerNorm LM head spill 20
      // bytes (fp16, bf16; 0 before).
      if constexpr (kLn) {  // mean - x0 and 1 / std of product row m
        const float2 ln = ln_row_stats(ln_stats, M, m, inv_k, p.eps);
        y = ln.y * (y - ln.x * in.ln_sum);
      }
      y = epilogue<T, OUT>(p, m, n + r, y, in, OUT == SkinnyOutput::kBiasQkv ? slots[m] : -1);
      if constexpr (kArgmax) key = make_key(y, n + r);
    }
    if constexpr (kArgmax) argmax_merge<M, R>(key);
    in = next_in;
  }
  if constexpr (kArgmax) argmax_publish<M>(p.argmax);
  trace.commit(p.N, p.K, p.rows);
}

// Blocks of kernel (with smem bytes of shared memory) that fit on one SM at once.
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, size_t>, int> cache;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), smem);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem));
  return cache[key] = std::max(blocks, 1);
}

template <typename T, SkinnyInput IN, SkinnyOutput OUT, int R, int VPR>
void launch_resident_variant(const SkinnyParams<T>& p, cudaStream_t stream, bool pdl) {
  auto kernel = skinny_gemm_kernel<T, 1, IN, OUT, false, R, VPR>;
  allow_dynamic_smem(kernel, kMaxSmemWithLayerNorm);
  launch_kernel(kernel, dim3(ceil_div(p.N, kWarps * R)), dim3(kThreads),
                smem_bytes(1, p.K, IN == SkinnyInput::kLayerNorm), stream, pdl, p, 1,
                1.f / float(p.K));
}

// (R, VPR) of the resident variants built (skinny_resident_rows picks among them): gpt2's K
// (768, 3,072) and gpt2-medium's (1,024, 4,096) in 16-bit types.
constexpr int kResidentVariants[][2] = {{1, 3}, {3, 3}, {1, 4}, {3, 4}, {4, 4}, {1, 12}, {1, 16}};

// The resident variant of skinny_resident_rows (R rows a warp, rows of 32 VPR vectors): the
// entry of kResidentVariants that matches, one instantiation each.
template <typename T, SkinnyInput IN, SkinnyOutput OUT, size_t... I>
void launch_resident(const SkinnyParams<T>& p, int R, cudaStream_t stream, bool pdl,
                     std::index_sequence<I...>) {
  constexpr const int(&v)[sizeof...(I)][2] = kResidentVariants;
  const int VPR = p.K / (32 * kVec16<T>);
  const bool launched = ((R == v[I][0] && VPR == v[I][1] &&
                          (launch_resident_variant<T, IN, OUT, v[I][0], v[I][1]>(p, stream, pdl),
                           true)) ||
                         ...);
  if (!launched) {
    throw std::logic_error("skinny GEMM: no resident variant of R=" + std::to_string(R) +
                           ", K=" + std::to_string(p.K));
  }
}

template <typename T, int M, SkinnyInput IN, SkinnyOutput OUT, bool kArgmax = false>
void launch_tile(const SkinnyParams<T>& p, int num_sms, cudaStream_t stream, bool pdl) {
  if constexpr (M == 1 && OUT != SkinnyOutput::kLogits && sizeof(T) == 2) {
    if (p.resident && p.rows == 1) {
      const int R = skinny_resident_rows(p.N, p.K, sizeof(T), num_sms);
      if (R > 0) {
        return launch_resident<T, IN, OUT>(
            p, R, stream, pdl, std::make_index_sequence<std::size(kResidentVariants)>{});
      }
    }
  }
  constexpr int R = kRowsPerWarp<M, OUT>;
  int warps_per_row = R > 1 ? 1 : p.warps_per_row;
  if (warps_per_row == 0) warps_per_row = skinny_warps_per_row(p.N, p.K, sizeof(T), num_sms);
  const size_t smem = smem_bytes(M, p.K, IN == SkinnyInput::kLayerNorm);
  auto launch = [&](auto kernel) {
    allow_dynamic_smem(kernel, kMaxSmemWithLayerNorm);
    const int blocks = std::min(ceil_div(p.N, kWarps / warps_per_row * R),
                                resident_blocks_per_sm(kernel, smem) * num_sms);
    launch_kernel(kernel, dim3(blocks), dim3(kThreads), smem, stream, pdl, p, warps_per_row,
                  1.f / float(p.K));
  };
  // One row of a 16-bit type: kernels built for 1 and 2 warps a row (every layer GEMV of
  // gpt2-large and gpt2-xl takes one or the other), so that the row's indexing is constant.
  // NOTE: measured on an H200 (bench_env.py, batch 1, two builds in alternating processes):
  // gpt2-xl 639 / 635 -> 664 / 664 tok/s (1.57 -> 1.51 ms), gpt2-large 1,103 / 1,108 -> 1,138 /
  // 1,133, gpt2-medium 2,414 / 2,406 -> 2,452 / 2,453, gpt2 5,420 / 5,401 -> 5,366 / 5,380
  // (its layer GEMVs are resident, built for one warp a row too; notes.md, thirty-fourth
  // session).
  if constexpr (M == 1 && sizeof(T) == 2 && R > 1) {  // several rows a warp: always one warp a row
    launch(skinny_gemm_kernel<T, M, IN, OUT, kArgmax, 0, 0, 1>);
  } else {
    if constexpr (M == 1 && sizeof(T) == 2) {
      if (warps_per_row == 1) return launch(skinny_gemm_kernel<T, M, IN, OUT, kArgmax, 0, 0, 1>);
      if (warps_per_row == 2) return launch(skinny_gemm_kernel<T, M, IN, OUT, kArgmax, 0, 0, 2>);
    }
    launch(skinny_gemm_kernel<T, M, IN, OUT, kArgmax>);
  }
}

template <typename T, int M>
void launch_rows(const SkinnyParams<T>& p, SkinnyInput in, SkinnyOutput out, int num_sms,
                 cudaStream_t stream, bool pdl) {
  using I = SkinnyInput;
  using O = SkinnyOutput;
  if (in == I::kLayerNorm) {
    switch (out) {
      case O::kBias:
        return launch_tile<T, M, I::kLayerNorm, O::kBias>(p, num_sms, stream, pdl);
      case O::kBiasGelu:
        return launch_tile<T, M, I::kLayerNorm, O::kBiasGelu>(p, num_sms, stream, pdl);
      case O::kBiasQkv:
        return launch_tile<T, M, I::kLayerNorm, O::kBiasQkv>(p, num_sms, stream, pdl);
      case O::kLogits:
        if (p.argmax) {
          return launch_tile<T, M, I::kLayerNorm, O::kLogits, true>(p, num_sms, stream, pdl);
        }
        return launch_tile<T, M, I::kLayerNorm, O::kLogits>(p, num_sms, stream, pdl);
      default: break;
    }
  } else if (in == I::kAttentionPartials) {
    if (out == O::kBiasResidual) {
      return launch_tile<T, M, I::kAttentionPartials, O::kBiasResidual>(p, num_sms, stream, pdl);
    }
  } else {
    switch (out) {
      case O::kBias:
        return launch_tile<T, M, I::kActivation, O::kBias>(p, num_sms, stream, pdl);
      case O::kBiasGelu:
        return launch_tile<T, M, I::kActivation, O::kBiasGelu>(p, num_sms, stream, pdl);
      case O::kBiasResidual:
        return launch_tile<T, M, I::kActivation, O::kBiasResidual>(p, num_sms, stream, pdl);
      case O::kLogits:
        return launch_tile<T, M, I::kActivation, O::kLogits>(p, num_sms, stream, pdl);
      default: break;
    }
  }
  throw std::invalid_argument("skinny GEMM: unsupported prologue/epilogue pair");
}

// fold [2, N] = (W ln_weight, W ln_bias + bias): a warp per row of W, in float32.
template <typename T>
__global__ void fold_layernorm_kernel(float* __restrict__ fold, const T* __restrict__ weight,
                                      const float* __restrict__ ln_weight,
                                      const float* __restrict__ ln_bias,
                                      const T* __restrict__ bias, int N, int K) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  const T* w = weight + int64_t(n) * K;
  float s = 0.f, c = 0.f;
  for (int k = lane; k < K; k += 32) {
    const float x = to_float(w[k]);
    s += x * ln_weight[k];
    c += x * ln_bias[k];
  }
  s = warp_sum(s), c = warp_sum(c);
  if (lane == 0) {
    fold[n] = s;
    fold[N + n] = c + (bias ? to_float(bias[n]) : 0.f);
  }
}

}  // namespace

template <typename T>
void launch_fold_layernorm(float* fold, const T* weight, const float* ln_weight,
                           const float* ln_bias, const T* bias, int N, int K,
                           cudaStream_t stream) {
  if (N <= 0) return;
  constexpr int kRowsPerBlock = kThreads / 32;
  fold_layernorm_kernel<T><<<ceil_div(N, kRowsPerBlock), kThreads, 0, stream>>>(
      fold, weight, ln_weight, ln_bias, bias, N, K);
  CUDA_CHECK_LAUNCH();
}

namespace {

// What stage_attention reads must be there and inside the workspace.
template <typename T>
void check_partials(const SkinnyParams<T>& p) {
  const int D = p.head_size;
  const DecodeWorkspace& ws = p.partials;
  if (!(ws.partial_out && ws.partial_max && ws.partial_sum && p.context_lens)) {
    throw std::invalid_argument(
        "skinny GEMM: attention partials need the workspace and the context lengths");
  }
  if (D <= 0 || D % 4 != 0 || p.K % D != 0 || p.partition_size <= 0 || p.max_partitions <= 0) {
    throw std::invalid_argument("skinny GEMM: attention partials of head size " +
                                std::to_string(D) + " (a multiple of 4 dividing K=" +
                                std::to_string(p.K) + "), partition size " +
                                std::to_string(p.partition_size) + ", " +
                                std::to_string(p.max_partitions) + " partitions");
  }
  if (!skinny_merges_attention(p.rows, p.K)) {
    throw std::invalid_argument("skinny GEMM: attention partials of " + std::to_string(p.rows) +
                                " rows x K=" + std::to_string(p.K) + ": at most " +
                                std::to_string(kThreads) +
                                " float4 vectors of x (skinny_merges_attention)");
  }
  if (int64_t(p.rows) * (p.K / D) * p.max_partitions > ws.capacity_rows) {
    throw std::invalid_argument("skinny GEMM: attention partials past the workspace (" +
                                std::to_string(ws.capacity_rows) + " rows)");
  }
}

}  // namespace

bool skinny_gemm_supported(int rows, int K) {
  return rows >= 1 && rows <= kSkinnyMaxRows && K % 8 == 0 &&
         smem_bytes(padded_rows(rows), K, false) <= kMaxSmem &&
         smem_bytes(padded_rows(rows), K, true) <= kMaxSmemWithLayerNorm;
}

int skinny_warps_per_row(int N, int K, int elem_bytes, int num_sms) {
  const int vecs = K * elem_bytes / 16;  // 16-byte vectors a row
  int w = 1;
  while (w < kWarps && ceil_div(N, kWarps / w) < 2 * num_sms && vecs >= 64 * w) w *= 2;
  return w;
}

int skinny_resident_rows(int N, int K, int elem_bytes, int num_sms) {
  // R: the fewest rows a warp (variants in that order) that keep to one block an SM.
  if (elem_bytes != 2 || N <= 0) return 0;
  for (const auto& [R, VPR] : kResidentVariants) {
    if (K == 32 * VPR * 8 && ceil_div(N, kWarps * R) <= num_sms) return R;
  }
  return 0;
}

bool skinny_merges_attention(int rows, int K) {
  return skinny_gemm_supported(rows, K) && padded_rows(rows) * K / 4 <= kThreads;
}

template <typename T>
void launch_skinny_gemm(const SkinnyParams<T>& p, SkinnyInput input, SkinnyOutput output,
                        int num_sms, cudaStream_t stream, bool pdl) {
  if (p.rows <= 0) return;
  if (!skinny_gemm_supported(p.rows, p.K)) {
    throw std::invalid_argument("skinny GEMM: unsupported shape rows=" + std::to_string(p.rows) +
                                ", K=" + std::to_string(p.K));
  }
  if (input == SkinnyInput::kLayerNorm && !(p.ln_weight && p.ln_fold)) {
    throw std::invalid_argument(
        "skinny GEMM: a LayerNorm input needs ln_weight and ln_fold (launch_fold_layernorm)");
  }
  if (input == SkinnyInput::kAttentionPartials) check_partials(p);
  if (p.argmax && !(input == SkinnyInput::kLayerNorm && output == SkinnyOutput::kLogits)) {
    throw std::invalid_argument(
        "skinny GEMM: greedy keys (argmax) come with the LayerNorm LM head only");
  }
  switch (padded_rows(p.rows)) {
    case 1: return launch_rows<T, 1>(p, input, output, num_sms, stream, pdl);
    case 2: return launch_rows<T, 2>(p, input, output, num_sms, stream, pdl);
    case 4: return launch_rows<T, 4>(p, input, output, num_sms, stream, pdl);
    default: return launch_rows<T, 8>(p, input, output, num_sms, stream, pdl);
  }
}

#if defined(PAGEDGPT2_TRACE)
bool stage_trace_built() { return true; }

void stage_trace_reset() {
  const unsigned zero = 0;
  CUDA_CHECK(cudaMemcpyToSymbol(g_stage_count, &zero, sizeof(zero)));
}

std::vector<StageRecord> stage_trace_read() {
  CUDA_CHECK(cudaDeviceSynchronize());
  unsigned count = 0;
  CUDA_CHECK(cudaMemcpyFromSymbol(&count, g_stage_count, sizeof(count)));
  std::vector<StageRecord> records(std::min<unsigned>(count, kStageTraceCapacity));
  if (!records.empty()) {
    CUDA_CHECK(cudaMemcpyFromSymbol(records.data(), g_stage_records,
                                    records.size() * sizeof(StageRecord)));
  }
  return records;
}
#else
bool stage_trace_built() { return false; }
void stage_trace_reset() {}
std::vector<StageRecord> stage_trace_read() { return {}; }
#endif

template void launch_skinny_gemm<float>(const SkinnyParams<float>&, SkinnyInput, SkinnyOutput, int,
                                        cudaStream_t, bool);
template void launch_skinny_gemm<__half>(const SkinnyParams<__half>&, SkinnyInput, SkinnyOutput,
                                         int, cudaStream_t, bool);
template void launch_skinny_gemm<__nv_bfloat16>(const SkinnyParams<__nv_bfloat16>&, SkinnyInput,
                                                SkinnyOutput, int, cudaStream_t, bool);

#define INSTANTIATE_FOLD(T)                                                                   \
  template void launch_fold_layernorm<T>(float*, const T*, const float*, const float*,      \
                                         const T*, int, int, cudaStream_t);
INSTANTIATE_FOLD(float)
INSTANTIATE_FOLD(__half)
INSTANTIATE_FOLD(__nv_bfloat16)
#undef INSTANTIATE_FOLD

}  // namespace pagedgpt2::cuda

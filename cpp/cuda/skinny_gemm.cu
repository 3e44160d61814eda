// Skinny GEMM kernels (see skinny_gemm.cuh for what is fused).
//
// Block = 8 warps. Each output column n (a row of W) is owned by `warps_per_row` warps that split
// K; a warp reads W[n, :] in 16-byte vectors (lane-contiguous, so a warp-load is 512 coalesced
// bytes) and multiplies it with the M staged rows of x held in shared memory as float32.
// NOTE: warps_per_row is picked per launch so that there are >= 2 blocks per SM: N=768 layers
// (proj, fc_proj) split K over 4 warps, N >= 2304 use one warp per output.
// NOTE: the first batch of weight loads is issued before x is staged, so the DRAM latency of W
// overlaps the LayerNorm prologue. The grid never exceeds what is resident at once: blocks loop
// over row groups (x staged once per block, no second wave waiting to start its loads).
// NOTE: the blocks also ask L2 for p.prefetch (a few MB of the next GEMVs' weights, see
// l2_ahead in cuda_model.cu) before they wait: the next kernel's first loads then hit L2.
// NOTE: at batch 1 a GEMV is a chain of dependent memory round trips, and only those after
// pdl_wait are on the step's critical path. So everything that does not depend on the kernel
// before (the LayerNorm parameters, into shared memory; each row's bias) is loaded before the
// wait, and what does (the residual row it adds to, the QKV's cache slots) is loaded right after
// it, beside x, instead of in the epilogue.
#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/cuda_common.cuh"
#include "cuda/skinny_gemm.cuh"
#include "cuda/stage_trace.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte weight vectors in flight per lane
constexpr int kMinBlocksPerSm = 3;  // register cap: 3 x 8 warps keep ~100 KB of W in flight
// NOTE: 4-warp blocks, 7 an SM (72 registers, 28 warps an SM) were slower everywhere on an H200
// (gpt2 batch 1 0.313 -> 0.380 ms a step, gpt2-xl 2.06 -> 2.68; spills at 1 row). notes.md,
// fifteenth session.
constexpr size_t kMaxSmem = 100 * 1024 + kWarps * kSkinnyMaxRows * 4;  // x and the partials
// ... and the LayerNorm parameters too: under the 163 KB a block may ask for on sm_80 (227 on
// sm_90).
constexpr size_t kMaxSmemWithLayerNorm = 160 * 1024;

int padded_rows(int rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

// x [m_tile, K], the partial sums [kWarps, m_tile], the rows' cache slots [m_tile] and, with a
// LayerNorm prologue, its weight and bias [2, K].
size_t smem_bytes(int m_tile, int K, bool layernorm) {
  return (size_t(m_tile) * K + (kWarps + 1) * m_tile + (layernorm ? 2 * size_t(K) : 0)) * 4;
}

// Copies the LayerNorm weight and bias into shared memory (all threads; the caller syncs).
__device__ __forceinline__ void stage_ln_params(float* w, float* b, const float* ln_weight,
                                                const float* ln_bias, int K) {
  for (int k = threadIdx.x; k < K; k += kThreads) {
    w[k] = ln_weight[k];
    b[k] = ln_bias[k];
  }
}

// Copies the M rows of vecs_per_row 16-byte vectors each with all threads: load(m, c) reads
// vector c of row m (raw bytes), store(i, v) writes vector i = m * vecs_per_row + c. kStageBatch
// loads a thread are in flight before their stores, so a block copies its x in one round trip
// to L2 (a few at most) instead of one per vector a thread.
// NOTE: measured (H200, tools/trace_gemv.py): copying x one vector at a time took 0.7 us a
// round trip, 2 round trips at gpt2's fc_proj (K 3,072) and 4 at gpt2-xl's (K 6,400).
// NOTE: after pdl_wait every instruction is on the step's critical path, and a warp's are
// dependent: the row of vector i is found by M - 1 compares, not by a division (an integer
// division by a runtime value is ~40 dependent instructions, once per vector). Loads stay raw
// (uint4) until stored: a Vec<__half, 8> was repacked register by register right after its
// load, so each load waited for the one before. With the LayerNorm loops below and 1/K from
// the host, this cut the 1-row kernels' code after the wait by ~40% and gpt2's batch-1 step
// from 0.288 to 0.252 ms (gpt2-xl 1.93 -> 1.68; H200, notes.md, twenty-first session).
constexpr int kStageBatch = 4;
template <int M, typename Load, typename Store>
__device__ __forceinline__ void stage_vectors(int vecs_per_row, Load load, Store store) {
  const int n_vecs = M * vecs_per_row;
  for (int base = threadIdx.x; base < n_vecs; base += kStageBatch * kThreads) {
    uint4 v[kStageBatch];
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      const int i = base + j * kThreads;
      if (i < n_vecs) {
        int m = 0;
#pragma unroll
        for (int r = 1; r < M; ++r) m += i >= r * vecs_per_row;
        v[j] = load(m, i - m * vecs_per_row);
      }
    }
#pragma unroll
    for (int j = 0; j < kStageBatch; ++j) {
      if (base + j * kThreads < n_vecs) store(base + j * kThreads, v[j]);
    }
  }
}

// Calls f(k) for k = threadIdx.x, + kThreads, ... < K, U at a time: their shared-memory loads are
// in flight together (an unrolled loop of unknown count runs its remainder one by one).
template <int U, typename F>
__device__ __forceinline__ void for_each_k(int K, F f) {
#pragma unroll 1
  for (int k0 = threadIdx.x; k0 < K; k0 += U * kThreads) {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (k0 + j * kThreads < K) f(k0 + j * kThreads);
    }
  }
}

// Normalizes the M rows of xs [M, K] in place with every thread of the block (the rows are
// staged and the block synced): two passes (the mean, then the variance about it), each summed
// across the block through red [kWarps, M]. Rows m >= rows (zeros) are left as they are.
// NOTE: measured (H200, tools/trace_gemv.py, batch 1): staging and normalizing x took 2.4-2.5
// us at gpt2 (K 768) and 3.3-3.8 at gpt2-xl (K 1,600) with one warp a row and the other 7 idle;
// 2.0-2.1 and 2.6-2.8 this way (gpt2 0.311 -> 0.289 ms a step, gpt2-xl 2.06 -> 1.93).
// NOTE: both sums in one pass, kept in registers while x is staged (x - the row's first value
// and its square, 2 barriers after the wait instead of 6), was slower: gpt2 batch 1 0.289 ->
// 0.297 ms, gpt2-xl 1.93 -> 1.99 (H200; ptxas spilled 3 more values to the 1-row QKV's loop).
// inv_k: 1 / K from the host (a float division is a call on the critical path), and rsqrtf.
template <typename T, int M>
__device__ __forceinline__ void block_layernorm_rows(float* xs, float* red, const float* ln_w,
                                                     const float* ln_b, int K, float inv_k,
                                                     int rows, float eps) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kLnUnroll = M <= 2 ? 4 : 1;  // more rows would spill
  // The sum over the block of f(m, x) for each row m, given to every thread.
  auto block_sums = [&](auto f, float (&out)[M]) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = 0.f;
      for_each_k<kLnUnroll>(K, [&](int k) { v += f(m, xs[m * K + k]); });
      v = warp_sum(v);
      if (lane == 0) red[warp * M + m] = v;
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = 0.f;
#pragma unroll
      for (int j = 0; j < kWarps; ++j) v += red[j * M + m];
      out[m] = v;
    }
    __syncthreads();  // red is reused
  };
  float mean[M], rstd[M];
  block_sums([](int, float x) { return x; }, mean);
#pragma unroll
  for (int m = 0; m < M; ++m) mean[m] *= inv_k;
  block_sums([&](int m, float x) { return (x - mean[m]) * (x - mean[m]); }, rstd);
#pragma unroll
  for (int m = 0; m < M; ++m) rstd[m] = rsqrtf(rstd[m] * inv_k + eps);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) continue;
    for_each_k<kLnUnroll>(K, [&](int k) {
      // Rounded to T, as the wide path's LayerNorm output is before its GEMM.
      const float y = (xs[m * K + k] - mean[m]) * rstd[m] * ln_w[k] + ln_b[k];
      xs[m * K + k] = to_float(from_float<T>(y));
    });
  }
}

// x staged into xs [M, K] as float32, rows m >= p.rows zero; with kLayerNorm, normalized (ln_w,
// ln_b: the LayerNorm parameters in shared memory; red: [kWarps, M] scratch). The caller syncs.
template <typename T, int M, SkinnyInput IN>
__device__ __forceinline__ void stage_x(float* xs, float* red, const SkinnyParams<T>& p,
                                        const float* ln_w, const float* ln_b, float inv_k) {
  const int K = p.K;
  auto row_of = [&](int m) { return int64_t(p.x_rows ? p.x_rows[m] : m); };
  if constexpr (IN == SkinnyInput::kLayerNorm) {
    // x is the float32 residual stream; K % 8 == 0 (skinny_gemm_supported).
    const float* x = static_cast<const float*>(p.x);
    stage_vectors<M>(
        K / 4,
        [&](int m, int c) {
          return m < p.rows ? reinterpret_cast<const uint4*>(x + row_of(m) * K)[c]
                            : make_uint4(0, 0, 0, 0);
        },
        [&](int i, const uint4& v) { reinterpret_cast<uint4*>(xs)[i] = v; });
    __syncthreads();
    block_layernorm_rows<T, M>(xs, red, ln_w, ln_b, K, inv_k, p.rows, p.eps);
  } else {
    constexpr int V = kVec16<T>;
    const T* x = static_cast<const T*>(p.x);
    stage_vectors<M>(
        K / V,
        [&](int m, int c) {
          return m < p.rows ? reinterpret_cast<const uint4*>(x + row_of(m) * K)[c]
                            : make_uint4(0, 0, 0, 0);  // zero bits: 0.0 in every T
        },
        [&](int i, const uint4& v) {
          float f[V];
          unpack16<T>(v, f);
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            reinterpret_cast<float4*>(xs + i * V)[q] =
                make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
          }
        });
  }
}

// What the epilogue of output (m, n) adds, loaded ahead of it: the bias (before the wait) and
// the residual value (after it).
struct EpilogueInputs {
  float bias = 0.f;
  float residual = 0.f;
};

// Rows a warp takes at once. The LM head's rows are short (gpt2: 1.5 KB, three vectors a lane)
// and many (16 row groups a block), so at 1-2 rows a warp reads 4 consecutive rows as one run
// of 4 * K: its second batch of vectors in flight is no longer past the end of its row.
// NOTE: measured (H200): gpt2 0.331 -> 0.322 ms a step at batch 1, 0.397 -> 0.375 at batch 2;
// gpt2-xl batch 2 2.83 -> 2.71 ms, batch 1 unchanged.
template <int M, SkinnyOutput OUT>
constexpr int kRowsPerWarp = OUT == SkinnyOutput::kLogits && M <= 2 ? 4 : 1;

// slot: the cache slot of row m (kBiasQkv), copied into shared memory beside x.
template <typename T, SkinnyOutput OUT>
__device__ __forceinline__ void epilogue(const SkinnyParams<T>& p, int m, int n, float y,
                                         const EpilogueInputs& in, int32_t slot) {
  const int64_t o = int64_t(m) * p.N + n;
  if constexpr (OUT == SkinnyOutput::kLogits) {
    static_cast<float*>(p.out)[o] = y;
    return;
  } else {
    y += in.bias;
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
}

template <typename T, int M, SkinnyInput IN, SkinnyOutput OUT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    skinny_gemm_kernel(const SkinnyParams<T> p, int warps_per_row, float inv_k) {
  extern __shared__ float smem[];
  float* xs = smem;                        // [M, K]
  float* partial = smem + M * p.K;         // [kWarps, M]
  int32_t* slots = reinterpret_cast<int32_t*>(partial + kWarps * M);  // [M] (kBiasQkv)
  float* ln_w = partial + (kWarps + 1) * M;  // [K] (kLayerNorm)
  float* ln_b = ln_w + p.K;                // [K] (kLayerNorm)
  constexpr int V = kVec16<T>;
  constexpr int R = kRowsPerWarp<M, OUT>;  // > 1: warps_per_row is 1, no bias or residual
  static_assert(R == 1 || OUT == SkinnyOutput::kLogits, "several rows a warp: logits only");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows_per_block = kWarps / warps_per_row * R;
  const int num_groups = (p.N + rows_per_block - 1) / rows_per_block;
  const int kslice = warp % warps_per_row;
  const int num_vecs = p.K / V;
  const int stride = warps_per_row * 32;
  // The first of the R rows this warp takes in `group`, and the vectors of their run.
  auto row_of = [&](int group) { return group * rows_per_block + warp / warps_per_row * R; };
  auto run_vecs = [&](int n) { return n < p.N ? min(R, p.N - n) * num_vecs : 0; };
  // The first kUnroll vectors this lane reads of the rows it takes in `group`.
  auto load_first = [&](int group, uint4 (&w)[kUnroll]) {
    const int n = row_of(group);
    const int run = run_vecs(n);
    const T* w_row = p.weight + int64_t(n) * p.K;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = kslice * 32 + lane + u * stride;
      if (idx < run) w[u] = reinterpret_cast<const uint4*>(w_row)[idx];
    }
  };

  // The lanes that write outputs: lane r * M + m (m < rows) of each row's first warp writes
  // product row m of its r-th row.
  const bool writer = kslice == 0 && lane < M * R && lane % M < p.rows;
  auto load_bias = [&](int group, EpilogueInputs& in) {
    const int n = row_of(group);
    if constexpr (OUT != SkinnyOutput::kLogits) {
      if (writer && n < p.N) in.bias = to_float(p.bias[n]);
    }
  };
  auto load_residual = [&](int group, EpilogueInputs& in) {  // after pdl_wait
    const int n = row_of(group);
    if constexpr (OUT == SkinnyOutput::kBiasResidual) {
      if (writer && n < p.N) {
        in.residual = static_cast<const float*>(p.out)[int64_t(lane) * p.N + n];
      }
    }
  };

  StageTrace trace;  // opt-in (PAGEDGPT2_TRACE); nothing otherwise
  pdl_launch_dependents();
  uint4 w[kUnroll];  // raw weight vectors
  load_first(blockIdx.x, w);
  EpilogueInputs in;
  load_bias(blockIdx.x, in);
  if constexpr (IN == SkinnyInput::kLayerNorm) {
    stage_ln_params(ln_w, ln_b, p.ln_weight, p.ln_bias, p.K);
  }
  prefetch_l2_share(p.prefetch);
  if constexpr (IN == SkinnyInput::kLayerNorm) __syncthreads();  // ln_w, ln_b staged
  pdl_wait();  // x and the outputs belong to earlier kernels: nothing before this touches them
  trace.mark(1);
  load_residual(blockIdx.x, in);
  // NOTE: the rows' cache slots are copied into shared memory beside x (cp.async: no register).
  // Held in a register across the LayerNorm, the slot was spilled, and the spill's store waited
  // for the slot's load before x's loads went out: two round trips to L2 instead of one.
  if constexpr (OUT == SkinnyOutput::kBiasQkv) {
    if (threadIdx.x < p.rows) cp_async4(&slots[threadIdx.x], &p.slot_mapping[threadIdx.x]);
    cp_async_commit();
  }
  stage_x<T, M, IN>(xs, partial, p, ln_w, ln_b, inv_k);
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
    const T* w_row = p.weight + int64_t(active ? n : 0) * p.K;
    float acc[M * R];  // [m * R + r]
#pragma unroll
    for (int i = 0; i < M * R; ++i) acc[i] = 0.f;
    // The vectors of chunk `base` (warp-uniform: lane l takes base + l + u * stride).
    auto load_chunk = [&](uint4 (&wv)[kUnroll], int base) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int idx = base + lane + u * stride;
        if (idx < run) wv[u] = reinterpret_cast<const uint4*>(w_row)[idx];
      }
    };
    auto multiply_chunk = [&](const uint4 (&wv)[kUnroll], int base) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
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
            const float4* xv = reinterpret_cast<const float4*>(xs + m * p.K + k);
            float dot = 0.f;
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {
              const float4 x4 = xv[q];
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
    if (active) {
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
    EpilogueInputs next_in = in;
    if (group + int(gridDim.x) < num_groups) {
      load_first(group + gridDim.x, w);
      load_bias(group + gridDim.x, next_in);
      load_residual(group + gridDim.x, next_in);
    }
#pragma unroll
    for (int i = 0; i < M * R; ++i) acc[i] = warp_sum(acc[i]);

    if (R == 1 && warps_per_row > 1) {
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
    if (writer && n + r < p.N) {
      float y = 0.f;
#pragma unroll
      for (int i = 0; i < M * R; ++i) {
        if (i == m * R + r) y = acc[i];
      }
      epilogue<T, OUT>(p, m, n + r, y, in, OUT == SkinnyOutput::kBiasQkv ? slots[m] : -1);
    }
    in = next_in;
  }
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

template <typename T, int M, SkinnyInput IN, SkinnyOutput OUT>
void launch_tile(const SkinnyParams<T>& p, int num_sms, cudaStream_t stream, bool pdl) {
  constexpr int R = kRowsPerWarp<M, OUT>;
  int warps_per_row = R > 1 ? 1 : p.warps_per_row;
  if (warps_per_row == 0) {
    warps_per_row = 1;
    while (warps_per_row < kWarps && ceil_div(p.N, kWarps / warps_per_row) < 2 * num_sms &&
           p.K / kVec16<T> >= 64 * warps_per_row) {
      warps_per_row *= 2;
    }
  }
  const size_t smem = smem_bytes(M, p.K, IN == SkinnyInput::kLayerNorm);
  auto kernel = skinny_gemm_kernel<T, M, IN, OUT>;
  allow_dynamic_smem(kernel, kMaxSmemWithLayerNorm);
  const int blocks = std::min(ceil_div(p.N, kWarps / warps_per_row * R),
                              resident_blocks_per_sm(kernel, smem) * num_sms);
  launch_kernel(kernel, dim3(blocks), dim3(kThreads), smem, stream, pdl, p, warps_per_row,
                1.f / float(p.K));
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
        return launch_tile<T, M, I::kLayerNorm, O::kLogits>(p, num_sms, stream, pdl);
      default: break;
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

}  // namespace

bool skinny_gemm_supported(int rows, int K) {
  return rows >= 1 && rows <= kSkinnyMaxRows && K % 8 == 0 &&
         smem_bytes(padded_rows(rows), K, false) <= kMaxSmem &&
         smem_bytes(padded_rows(rows), K, true) <= kMaxSmemWithLayerNorm;
}

template <typename T>
void launch_skinny_gemm(const SkinnyParams<T>& p, SkinnyInput input, SkinnyOutput output,
                        int num_sms, cudaStream_t stream, bool pdl) {
  if (p.rows <= 0) return;
  if (!skinny_gemm_supported(p.rows, p.K)) {
    throw std::invalid_argument("skinny GEMM: unsupported shape rows=" + std::to_string(p.rows) +
                                ", K=" + std::to_string(p.K));
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

}  // namespace pagedgpt2::cuda

// Skinny GEMM kernels (see skinny_gemm.cuh for what is fused).
//
// W streams through shared memory. A block takes row groups blockIdx.x, + gridDim.x, ... (the
// grid is at most what is resident at once); a group is R consecutive rows of W, one contiguous
// chunk of R * K elements (about 24 KB), copied with cp.async into one of kStages stages, so a
// block keeps kStages - 1 groups (up to ~75 KB) on their way from DRAM while it computes on one.
// With programmatic dependent launch those first copies are issued before the kernel waits for
// the one before it: the weights never depend on earlier kernels.
// x (M rows, after its LayerNorm prologue) sits in shared memory as float32. Row r of a group
// is reduced by kWarps / R warps splitting K (or each warp takes R / kWarps rows); lanes read
// 16-byte vectors, lane-contiguous.
#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/cuda_common.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/skinny_gemm.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 4;
constexpr size_t kStageTarget = 26 * 1024;   // bytes of W per group, at most (R >= 1 permitting)
constexpr size_t kSmemLimit = 227 * 1024;    // per block (sm_90; sm_80 has 163 KB)
constexpr size_t kSmemTwoBlocks = 113 * 1024;  // at most this, two blocks fit on an SM

int padded_rows(int rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

size_t x_bytes(int m_tile, int K) { return (size_t(m_tile) * K + kWarps * m_tile) * 4; }

// Rows of W per group: a power of two with kStages groups within `budget` bytes, about
// kStageTarget each, and small enough that there are a group per SM when N allows.
int rows_per_group(int N, int K, int elem_size, size_t budget, int num_sms) {
  const size_t row_bytes = size_t(K) * elem_size;
  int r = 1;
  while (r < 64 && 2 * r * row_bytes <= kStageTarget && 2 * r * row_bytes * kStages <= budget) r *= 2;
  while (r > 1 && (N + r - 1) / r < num_sms) r /= 2;
  return r;
}

template <typename T, int M, SkinnyInput IN>
__device__ __forceinline__ void stage_x(float* xs, const SkinnyParams<T>& p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int K = p.K;
  if constexpr (IN == SkinnyInput::kLayerNorm) {
    // Warp m normalizes row m in place in shared memory: the row is copied in with all its loads
    // in flight at once (one memory latency), then the statistics are two passes over shared
    // memory. NOTE: holding the row in registers instead cost 40 registers per thread, which
    // halved the blocks per SM.
    if (warp < M) {
      const int m = warp;
      float* dst = xs + m * K;
      if (m < p.rows) {
        const int64_t row = p.x_rows ? p.x_rows[m] : m;
        const float* x = static_cast<const float*>(p.x) + row * K;
        if (K % 4 == 0) {
          const float4* x4 = reinterpret_cast<const float4*>(x);
          float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll 8
          for (int j = lane; j < K / 4; j += 32) d4[j] = x4[j];
        } else {
          for (int k = lane; k < K; k += 32) dst[k] = x[k];
        }
        __syncwarp();
        // Rounded to T, as the wide path's LayerNorm output is before its GEMM.
        warp_layernorm_row(dst, p.ln_weight, p.ln_bias, K, p.eps,
                           [&](int k, float y) { dst[k] = to_float(from_float<T>(y)); });
      } else {
        for (int k = lane; k < K; k += 32) dst[k] = 0.f;
      }
    }
  } else {
    constexpr int V = kVec16<T>;
    const int vecs_per_row = K / V;
    for (int i = threadIdx.x; i < M * vecs_per_row; i += kThreads) {
      const int m = i / vecs_per_row, k = (i % vecs_per_row) * V;
      float v[V];
      if (m < p.rows) {
        const int64_t row = p.x_rows ? p.x_rows[m] : m;
        load_floats<T, V>(static_cast<const T*>(p.x) + row * K + k, v);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) xs[m * K + k + e] = v[e];
    }
  }
}

template <typename T, SkinnyOutput OUT>
__device__ __forceinline__ void epilogue(const SkinnyParams<T>& p, int m, int n, float y) {
  const int64_t o = int64_t(m) * p.N + n;
  if constexpr (OUT == SkinnyOutput::kLogits) {
    static_cast<float*>(p.out)[o] = y;
    return;
  } else {
    y += to_float(p.bias[n]);
    if constexpr (OUT == SkinnyOutput::kBiasResidual) {
      static_cast<float*>(p.out)[o] += y;
    } else if constexpr (OUT == SkinnyOutput::kBiasGelu) {
      static_cast<T*>(p.out)[o] = from_float<T>(gelu_tanh(y));
    } else {
      const T v = from_float<T>(y);
      static_cast<T*>(p.out)[o] = v;
      if constexpr (OUT == SkinnyOutput::kBiasQkv) {
        const int C = p.N / 3;
        const int64_t slot = p.slot_mapping[m];
        if (n >= C && slot >= 0) {
          T* cache = n < 2 * C ? p.k_cache : p.v_cache;
          cache[slot * C + (n < 2 * C ? n - C : n - 2 * C)] = v;
        }
      }
    }
  }
}

template <typename T, int M, SkinnyInput IN, SkinnyOutput OUT>
__global__ void __launch_bounds__(kThreads)
    skinny_gemm_kernel(const SkinnyParams<T> p, int rows_per_group) {
  extern __shared__ __align__(16) float smem[];
  float* xs = smem;                                      // [M, K]
  float* partial = xs + M * p.K;                         // [kWarps, M]
  T* stages = reinterpret_cast<T*>(partial + kWarps * M);  // [kStages, R * K]
  constexpr int V = kVec16<T>;
  const int K = p.K, R = rows_per_group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_groups = (p.N + R - 1) / R;
  const int num_vecs = K / V;
  const int64_t stage_elems = int64_t(R) * K;
  // Row r of a group is reduced by warps_per_row warps (K-slice `kslice`), or a warp takes
  // rows warp, warp + kWarps, ... when R > kWarps.
  const int warps_per_row = R < kWarps ? kWarps / R : 1;
  const int kslice = warp % warps_per_row;
  const int first_row = warp / warps_per_row;
  const int row_step = kWarps / warps_per_row;

  // Copies group `it` of this block (rows past N are not copied) into its stage; every call
  // commits one cp.async group, possibly empty, so that cp_async_wait counts groups.
  auto issue = [&](int it) {
    const int group = blockIdx.x + it * int(gridDim.x);
    if (group < num_groups) {
      const int n0 = group * R;
      const int vecs = min(R, p.N - n0) * num_vecs;
      const T* src = p.weight + int64_t(n0) * K;
      T* dst = stages + (it % kStages) * stage_elems;
      for (int i = threadIdx.x; i < vecs; i += kThreads) cp_async16(dst + i * V, src + i * V, true);
    }
    cp_async_commit();
  };

  pdl_launch_dependents();
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  pdl_wait();  // x and the outputs belong to earlier kernels: nothing before this touches them
  stage_x<T, M, IN>(xs, p);

  for (int it = 0; blockIdx.x + it * int(gridDim.x) < num_groups; ++it) {
    cp_async_wait<kStages - 2>();  // this thread's copies of group `it` have landed ...
    __syncthreads();               // ... and everyone's (and x); the stage of it - 1 is free
    issue(it + kStages - 1);
    const T* w_group = stages + (it % kStages) * stage_elems;
    const int n0 = (blockIdx.x + it * int(gridDim.x)) * R;
    for (int r = first_row; r < R; r += row_step) {
      const int n = n0 + r;
      const bool active = n < p.N;  // uniform over the warps of row r
      float acc[M];
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = 0.f;
      if (active) {
        const T* w_row = w_group + int64_t(r) * K;
        for (int j = kslice * 32 + lane; j < num_vecs; j += warps_per_row * 32) {
          const Vec<T, V> w = *reinterpret_cast<const Vec<T, V>*>(w_row + j * V);
          float wf[V];
#pragma unroll
          for (int e = 0; e < V; ++e) wf[e] = to_float(w.v[e]);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const float4* xv = reinterpret_cast<const float4*>(xs + m * K + j * V);
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {
              const float4 x4 = xv[q];
              acc[m] += wf[4 * q] * x4.x + wf[4 * q + 1] * x4.y + wf[4 * q + 2] * x4.z +
                        wf[4 * q + 3] * x4.w;
            }
          }
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
      if (warps_per_row > 1) {
        if (lane == 0) {
#pragma unroll
          for (int m = 0; m < M; ++m) partial[warp * M + m] = acc[m];
        }
        __syncthreads();
        if (kslice == 0) {
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float sum = 0.f;
            for (int j = 0; j < warps_per_row; ++j) sum += partial[(warp + j) * M + m];
            acc[m] = sum;
          }
        }
        __syncthreads();  // partial is rewritten by the next group
      }
      if (kslice != 0 || !active) continue;
      float y = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (lane == m) y = acc[m];
      }
      if (lane < M && lane < p.rows) epilogue<T, OUT>(p, lane, n, y);
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block (the trailing groups are empty)
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
  const size_t x_part = x_bytes(M, p.K);
  // Two blocks an SM when x leaves room for it, else one with all the room there is.
  const size_t budget = (x_part + kStages * kStageTarget <= kSmemTwoBlocks ? kSmemTwoBlocks
                                                                           : kSmemLimit) - x_part;
  const int R = rows_per_group(p.N, p.K, int(sizeof(T)), budget, num_sms);
  const size_t smem = x_part + size_t(kStages) * R * p.K * sizeof(T);
  auto kernel = skinny_gemm_kernel<T, M, IN, OUT>;
  allow_dynamic_smem(kernel, kSmemLimit);
  const int blocks = std::min(ceil_div(p.N, R), resident_blocks_per_sm(kernel, smem) * num_sms);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, R));
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
  // x, and kStages groups of one row at least.
  return rows >= 1 && rows <= kSkinnyMaxRows && K % 8 == 0 &&
         x_bytes(padded_rows(rows), K) + size_t(kStages) * K * 4 <= kSmemLimit;
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

template void launch_skinny_gemm<float>(const SkinnyParams<float>&, SkinnyInput, SkinnyOutput, int,
                                        cudaStream_t, bool);
template void launch_skinny_gemm<__half>(const SkinnyParams<__half>&, SkinnyInput, SkinnyOutput,
                                         int, cudaStream_t, bool);
template void launch_skinny_gemm<__nv_bfloat16>(const SkinnyParams<__nv_bfloat16>&, SkinnyInput,
                                                SkinnyOutput, int, cudaStream_t, bool);

}  // namespace pagedgpt2::cuda

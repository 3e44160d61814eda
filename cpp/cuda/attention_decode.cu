// Decode attention kernel (see attention_decode.cuh for the work split).
//
// Thread layout, for head size D and element type T: a key row of D elements is read by
// kLanes lanes, each loading kVecsPerLane 16-byte vectors (interleaved so a lane group reads one
// contiguous row); a warp covers 32 / kLanes keys at once and kUnroll such steps are loaded
// before any is used, so each warp keeps kUnroll * 512 bytes in flight. Scores go to shared
// memory (one float per token of the partition) in the log2 domain (q is pre-scaled by
// log2(e)/sqrt(D), softmax uses exp2). V uses the same layout: lane groups take keys
// round-robin, accumulate p * v in fp32 registers, then reduce across groups (shuffles inside a
// warp, shared memory across warps).
#include <cmath>

#include "cuda/attention_decode.cuh"
#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kMaxPartitionSize = 4096;  // shared-memory scores: 16 KB
constexpr int kMinPartitionSize = 128;
constexpr int kBlocksPerSm = 2;  // target when splitting

constexpr int largest_pow2_dividing(int n, int cap) {
  int p = 1;
  while (p * 2 <= cap && n % (p * 2) == 0) p *= 2;
  return p;
}

template <typename T, int D>
struct DecodeLayout {
  static constexpr int kVec = largest_pow2_dividing(D, kVec16<T>);  // elements per load
  static constexpr int kVecs = D / kVec;                            // loads per key row
  static constexpr int kLanes = largest_pow2_dividing(kVecs, 32);   // lanes per key row
  static constexpr int kVecsPerLane = kVecs / kLanes;
  static constexpr int kKeysPerWarp = 32 / kLanes;
  static constexpr int kGroups = kThreads / kLanes;                 // key rows in flight per step
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(T* __restrict__ out,                      // [S, H * D]
                            const T* __restrict__ qkv,                // [S, 3 * H * D]
                            const T* __restrict__ k_cache,            // [num_blocks, bs, H, D]
                            const T* __restrict__ v_cache,            // [num_blocks, bs, H, D]
                            const int32_t* __restrict__ context_lens, // [S]
                            const int32_t* __restrict__ block_tables, // [S, max_blocks]
                            int max_blocks, int block_size, float q_scale, int partition_size,
                            int max_partitions, DecodeWorkspace ws) {
  using L = DecodeLayout<T, D>;
  constexpr int kVec = L::kVec, kLanes = L::kLanes, kVpl = L::kVecsPerLane;
  constexpr int kGroups = L::kGroups;
  extern __shared__ float smem[];
  float* scores = smem;                        // [partition_size]
  float* red = smem + partition_size;          // [kWarps, D]
  __shared__ float scratch[32];
  __shared__ bool is_last;

  pdl_launch_dependents();  // the proj GEMV may start streaming its weights
  const int h = blockIdx.x, s = blockIdx.y, part = blockIdx.z;
  const int H = gridDim.x, C = H * D;
  const int context_len = context_lens[s];
  T* out_row = out + int64_t(s) * C + h * D;
  if (context_len <= 0) {  // padding row of a graph bucket
    if (part == 0) {
      for (int d = threadIdx.x; d < D; d += kThreads) out_row[d] = from_float<T>(0.f);
    }
    return;
  }
  const int num_parts = (context_len + partition_size - 1) / partition_size;
  if (part >= num_parts) return;
  const int start = part * partition_size;
  const int end = min(context_len, start + partition_size);
  const int n = end - start;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int lane_in_group = tid % kLanes;
  // NOTE: loops run on a warp-uniform base (the warp's first key of a step) so that every lane
  // reaches the shuffles; the lane group's own key is base + lane / kLanes.
  const int warp_first = start + warp * L::kKeysPerWarp;
  const int group_in_warp = lane / kLanes;
  const int32_t* table = block_tables + int64_t(s) * max_blocks;
  const int64_t head_offset = int64_t(h) * D;

  // q, pre-scaled, in registers: vector j of this lane is elements (lane_in_group + j*kLanes)*kVec.
  float q[kVpl][kVec];
  {
    const T* q_row = qkv + int64_t(s) * 3 * C + head_offset;
#pragma unroll
    for (int j = 0; j < kVpl; ++j) {
      load_floats<T, kVec>(q_row + (lane_in_group + j * kLanes) * kVec, q[j]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[j][e] *= q_scale;
    }
  }

  // ---- scores = q . k for every token of the partition
  float local_max = -INFINITY;
  for (int base = warp_first; base < end; base += kGroups * kUnroll) {
    Vec<T, kVec> k[kUnroll][kVpl];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + group_in_warp + u * kGroups;
      if (t < end) {
        const int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
        const T* k_row = k_cache + slot * C + head_offset;
#pragma unroll
        for (int j = 0; j < kVpl; ++j) {
          k[u][j] = *reinterpret_cast<const Vec<T, kVec>*>(k_row +
                                                           (lane_in_group + j * kLanes) * kVec);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + group_in_warp + u * kGroups;
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < kVpl; ++j) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += q[j][e] * to_float(k[u][j].v[e]);
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (t < end) {
        if (lane_in_group == 0) scores[t - start] = dot;
        local_max = fmaxf(local_max, dot);
      }
    }
  }
  const float max_score = block_max<kThreads>(local_max, scratch);  // syncs: scores visible

  float local_sum = 0.f;
  for (int i = tid; i < n; i += kThreads) {
    const float p = exp2f(scores[i] - max_score);
    scores[i] = p;
    local_sum += p;
  }
  const float sum = block_sum<kThreads>(local_sum, scratch);  // syncs: probabilities visible

  // ---- acc = sum_t p_t * v_t
  float acc[kVpl][kVec];
#pragma unroll
  for (int j = 0; j < kVpl; ++j) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[j][e] = 0.f;
  }
  for (int base = warp_first; base < end; base += kGroups * kUnroll) {
    Vec<T, kVec> v[kUnroll][kVpl];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + group_in_warp + u * kGroups;
      if (t < end) {
        const int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
        const T* v_row = v_cache + slot * C + head_offset;
#pragma unroll
        for (int j = 0; j < kVpl; ++j) {
          v[u][j] = *reinterpret_cast<const Vec<T, kVec>*>(v_row +
                                                           (lane_in_group + j * kLanes) * kVec);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + group_in_warp + u * kGroups;
      if (t < end) {
        const float p = scores[t - start];
#pragma unroll
        for (int j = 0; j < kVpl; ++j) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[j][e] += p * to_float(v[u][j].v[e]);
        }
      }
    }
  }
  // Reduce over the lane groups of a warp, then over warps.
#pragma unroll
  for (int j = 0; j < kVpl; ++j) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
#pragma unroll
      for (int o = kLanes; o < 32; o <<= 1) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], o);
    }
  }
  if (lane < kLanes) {
#pragma unroll
    for (int j = 0; j < kVpl; ++j) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) red[warp * D + (lane + j * kLanes) * kVec + e] = acc[j][e];
    }
  }
  __syncthreads();

  if (num_parts == 1) {
    const float inv = 1.f / sum;
    for (int d = tid; d < D; d += kThreads) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += red[w * D + d];
      out_row[d] = from_float<T>(o * inv);
    }
    return;
  }

  // ---- split path: publish this partition, the last one to finish merges.
  const int64_t sh = int64_t(s) * H + h;
  const int64_t row = sh * max_partitions + part;
  for (int d = tid; d < D; d += kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red[w * D + d];
    ws.partial_out[row * D + d] = o;
  }
  if (tid == 0) {
    ws.partial_max[row] = max_score;
    ws.partial_sum[row] = sum;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&ws.counters[sh], 1u) == unsigned(num_parts - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  const int64_t first = sh * max_partitions;
  float global_max = -INFINITY;
  for (int p = 0; p < num_parts; ++p) {
    global_max = fmaxf(global_max, __ldcg(ws.partial_max + first + p));
  }
  float total = 0.f;
  for (int p = 0; p < num_parts; ++p) {
    total += __ldcg(ws.partial_sum + first + p) *
             exp2f(__ldcg(ws.partial_max + first + p) - global_max);
  }
  const float inv = 1.f / total;
  for (int d = tid; d < D; d += kThreads) {
    float o = 0.f;
    for (int p = 0; p < num_parts; ++p) {
      o += __ldcg(ws.partial_out + (first + p) * D + d) *
           exp2f(__ldcg(ws.partial_max + first + p) - global_max);
    }
    out_row[d] = from_float<T>(o * inv);
  }
  if (tid == 0) ws.counters[sh] = 0;  // ready for the next launch (and graph replay)
}

template <typename T, int D>
void launch_d(T* out, const T* qkv, const T* k_cache, const T* v_cache,
              const int32_t* context_lens, const int32_t* block_tables, int num_seqs,
              int max_blocks, int num_heads, int block_size, int max_context_len,
              int partition_size, const DecodeWorkspace& ws, cudaStream_t stream) {
  const int num_parts = decode_num_partitions(max_context_len, partition_size);
  if (num_parts > 1 &&
      (int64_t(num_seqs) * num_heads * num_parts > ws.capacity_rows ||
       int64_t(num_seqs) * num_heads > ws.capacity_counters)) {
    throw std::runtime_error("decode attention: split workspace too small for this batch");
  }
  const float q_scale = float(M_LOG2E / std::sqrt(double(D)));
  const size_t smem = (size_t(partition_size) + kWarps * D) * sizeof(float);
  auto kernel = decode_attention_kernel<T, D>;
  allow_dynamic_smem(kernel, (size_t(kMaxPartitionSize) + kWarps * D) * sizeof(float));
  const dim3 grid(num_heads, num_seqs, num_parts);
  kernel<<<grid, kThreads, smem, stream>>>(out, qkv, k_cache, v_cache, context_lens,
                                           block_tables, max_blocks, block_size, q_scale,
                                           partition_size, num_parts, ws);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

int decode_partition_count(int num_seqs, int num_heads, int max_context_len, int num_sms) {
  max_context_len = std::max(max_context_len, 1);
  const int64_t items = int64_t(num_seqs) * num_heads;
  // NOTE: split only when the (sequence, head) pairs alone leave SMs idle; aim for kBlocksPerSm
  // blocks per SM, never below kMinPartitionSize tokens per block (the merge costs one more
  // pass). Tried on an H200: 8 blocks per SM and 32-token partitions left batch 1 unchanged
  // (15 us at context 1024) and cost batch 64 x 1024 six points of bandwidth.
  int parts = int(std::max<int64_t>(1, (int64_t(kBlocksPerSm) * num_sms + items - 1) / items));
  parts = std::min(parts, std::max(1, max_context_len / kMinPartitionSize));
  parts = std::max(parts, (max_context_len + kMaxPartitionSize - 1) / kMaxPartitionSize);
  return parts;
}

int decode_partition_size(int num_seqs, int num_heads, int max_context_len, int num_sms) {
  max_context_len = std::max(max_context_len, 1);
  const int parts = decode_partition_count(num_seqs, num_heads, max_context_len, num_sms);
  int size = (max_context_len + parts - 1) / parts;
  size = (size + 31) / 32 * 32;
  return std::min(size, kMaxPartitionSize);
}

bool decode_attention_supported(int head_size, int elem_size) {
  (void)elem_size;
  switch (head_size) {
    case 16: case 32: case 48: case 64: case 80: case 96: case 128: case 256: return true;
    default: return false;
  }
}

template <typename T>
void launch_decode_attention(T* out, const T* qkv, const T* k_cache, const T* v_cache,
                             const int32_t* context_lens, const int32_t* block_tables,
                             int num_seqs, int max_blocks, int num_heads, int head_size,
                             int block_size, int max_context_len, int partition_size,
                             const DecodeWorkspace& ws, cudaStream_t stream) {
  if (num_seqs <= 0) return;
#define CASE(D)                                                                                \
  case D:                                                                                      \
    return launch_d<T, D>(out, qkv, k_cache, v_cache, context_lens, block_tables, num_seqs,   \
                          max_blocks, num_heads, block_size, max_context_len, partition_size, \
                          ws, stream);
  switch (head_size) {
    CASE(16) CASE(32) CASE(48) CASE(64) CASE(80) CASE(96) CASE(128) CASE(256)
    default:
      throw std::invalid_argument("decode attention: no kernel for head size " +
                                  std::to_string(head_size));
  }
#undef CASE
}

#define INSTANTIATE(T)                                                                       \
  template void launch_decode_attention<T>(T*, const T*, const T*, const T*, const int32_t*, \
                                           const int32_t*, int, int, int, int, int, int, int, \
                                           const DecodeWorkspace&, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace pagedgpt2::cuda

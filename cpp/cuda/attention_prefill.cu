// Prefill attention: a flash-attention style kernel on CUDA cores, fp32 throughout.
//
// Grid (query tiles, sequences, heads); a block of 128 threads owns kTile query rows of one
// sequence and head, and walks the keys in tiles of kTile through the block table, keeping the
// running max / sum / output of an online softmax in shared memory. Q, K, V tiles are staged as
// float in shared memory (rows padded by one float so the q.k loop is free of bank conflicts).
// NOTE: tile 32 x 32 for D <= 128, 16 x 16 above (shared memory grows with D); no tensor cores:
// GPT-2 prefill time is dominated by the GEMMs, and this keeps one exact-fp32 kernel for all
// dtypes. A tensor-core (mma.sync) version is the next step if prefill attention shows up.
#include <cmath>

#include "cuda/attention_prefill.cuh"
#include "cuda/cuda_common.cuh"

namespace pagedgpt2::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadSize = 512;

int tile_for(int head_size) { return head_size <= 128 ? 32 : 16; }

size_t smem_floats(int tile, int D) {
  return size_t(tile) * (D + 1) * 2   // Q, K
         + size_t(tile) * D * 2       // V, O
         + size_t(tile) * (tile + 1)  // P
         + 3 * size_t(tile);          // row max, row sum, row rescale
}

// Loads `rows` rows of D elements (row r at src_row(r)) into dst [tile][ld] as float.
template <typename T, int kVecN, class RowPtr>
__device__ __forceinline__ void stage_rows(float* dst, int ld, int rows, int tile, int D,
                                           float scale, RowPtr src_row) {
  const int vecs = D / kVecN;
  for (int i = threadIdx.x; i < tile * vecs; i += kThreads) {
    const int r = i / vecs, d = (i % vecs) * kVecN;
    float v[kVecN];
    if (r < rows) {
      load_floats<T, kVecN>(src_row(r) + d, v);
    } else {
#pragma unroll
      for (int e = 0; e < kVecN; ++e) v[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < kVecN; ++e) dst[r * ld + d + e] = v[e] * scale;
  }
}

template <typename T, int kVecN>
__global__ void __launch_bounds__(kThreads)
    prefill_attention_kernel(T* __restrict__ out,                         // [T, H * D]
                             const T* __restrict__ qkv,                   // [T, 3 * H * D]
                             const T* __restrict__ k_cache,               // [blocks, bs, H, D]
                             const T* __restrict__ v_cache,               // [blocks, bs, H, D]
                             const int32_t* __restrict__ positions,       // [T]
                             const int32_t* __restrict__ query_start_loc,  // [S + 1]
                             const int32_t* __restrict__ block_tables,    // [S, max_blocks]
                             int max_blocks, int D, int block_size, float q_scale, int tile) {
  extern __shared__ float smem[];
  float* qs = smem;                          // [tile][D + 1]
  float* ks = qs + tile * (D + 1);           // [tile][D + 1]
  float* vs = ks + tile * (D + 1);           // [tile][D]
  float* os = vs + tile * D;                 // [tile][D]
  float* ps = os + tile * D;                 // [tile][tile + 1]
  float* row_max = ps + tile * (tile + 1);   // [tile]
  float* row_sum = row_max + tile;           // [tile]
  float* row_scale = row_sum + tile;         // [tile]
  __shared__ int q_pos[32];
  __shared__ int max_pos;

  const int s = blockIdx.y, h = blockIdx.z;
  const int H = gridDim.z, C = H * D;
  const int q0 = query_start_loc[s] + blockIdx.x * tile;
  const int q_end = query_start_loc[s + 1];
  if (q0 >= q_end) return;
  const int num_q = min(tile, q_end - q0);
  const int32_t* table = block_tables + int64_t(s) * max_blocks;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  if (tid < tile) {
    q_pos[tid] = tid < num_q ? positions[q0 + tid] : -1;
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.f;
  }
  for (int i = tid; i < tile * D; i += kThreads) os[i] = 0.f;
  stage_rows<T, kVecN>(qs, D + 1, num_q, tile, D, q_scale, [&](int r) {
    return qkv + int64_t(q0 + r) * 3 * C + h * D;
  });
  __syncthreads();
  if (tid == 0) {
    int m = -1;
    for (int r = 0; r < num_q; ++r) m = max(m, q_pos[r]);
    max_pos = m;
  }
  __syncthreads();

  for (int k0 = 0; k0 <= max_pos; k0 += tile) {
    const int num_k = min(tile, max_pos + 1 - k0);
    auto cache_row = [&](const T* cache, int r) {
      const int p = k0 + r;
      const int64_t slot = int64_t(table[p / block_size]) * block_size + p % block_size;
      return cache + slot * C + h * D;
    };
    stage_rows<T, kVecN>(ks, D + 1, num_k, tile, D, 1.f,
                         [&](int r) { return cache_row(k_cache, r); });
    stage_rows<T, kVecN>(vs, D, num_k, tile, D, 1.f,
                         [&](int r) { return cache_row(v_cache, r); });
    __syncthreads();

    // S = Q K^T (log2 domain), causal mask.
    for (int i = tid; i < tile * tile; i += kThreads) {
      const int r = i / tile, c = i % tile;
      float score = -INFINITY;
      if (r < num_q && c < num_k && k0 + c <= q_pos[r]) {
        const float* q = qs + r * (D + 1);
        const float* k = ks + c * (D + 1);
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += q[d] * k[d];
        score = dot;
      }
      ps[r * (tile + 1) + c] = score;
    }
    __syncthreads();

    // Online softmax, one warp per row (lanes over the tile's keys).
    for (int r = warp; r < tile; r += kWarps) {
      const float sc = lane < tile ? ps[r * (tile + 1) + lane] : -INFINITY;
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, warp_max(sc));
      float p = 0.f, rescale = 1.f;
      if (m_new != -INFINITY) {
        p = lane < tile ? exp2f(sc - m_new) : 0.f;  // exp2(-inf) = 0 for masked keys
        rescale = exp2f(m_old - m_new);             // 0 when m_old = -inf
      }
      const float p_sum = warp_sum(p);
      __syncwarp();  // NOTE: orders this row's reads before its overwrite (racecheck's model)
      if (lane < tile) ps[r * (tile + 1) + lane] = p;
      if (lane == 0) {
        row_sum[r] = row_sum[r] * rescale + p_sum;
        row_max[r] = m_new;
        row_scale[r] = rescale;
      }
    }
    __syncthreads();

    // O = O * rescale + P V
    for (int i = tid; i < tile * D; i += kThreads) {
      const int r = i / D, d = i % D;
      const float* p = ps + r * (tile + 1);
      float o = os[i] * row_scale[r];
      for (int c = 0; c < num_k; ++c) o += p[c] * vs[c * D + d];
      os[i] = o;
    }
    __syncthreads();
  }

  for (int i = tid; i < num_q * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const float l = row_sum[r];
    out[int64_t(q0 + r) * C + h * D + d] = from_float<T>(l > 0.f ? os[i] / l : 0.f);
  }
}

}  // namespace

template <typename T>
void launch_prefill_attention(T* out, const T* qkv, const T* k_cache, const T* v_cache,
                              const int32_t* positions, const int32_t* query_start_loc,
                              const int32_t* block_tables, int num_seqs, int max_blocks,
                              int num_heads, int head_size, int block_size, int max_query_len,
                              cudaStream_t stream) {
  if (num_seqs <= 0 || max_query_len <= 0) return;
  if (head_size > kMaxHeadSize) {
    throw std::invalid_argument("prefill attention: head size " + std::to_string(head_size) +
                                " > " + std::to_string(kMaxHeadSize));
  }
  const int tile = tile_for(head_size);
  const size_t smem = smem_floats(tile, head_size) * sizeof(float);
  const float q_scale = float(M_LOG2E / std::sqrt(double(head_size)));
  const dim3 grid(ceil_div(max_query_len, tile), num_seqs, num_heads);
  auto run = [&](auto kernel) {
    allow_dynamic_smem(kernel, smem_floats(16, kMaxHeadSize) * sizeof(float));
    kernel<<<grid, kThreads, smem, stream>>>(out, qkv, k_cache, v_cache, positions,
                                             query_start_loc, block_tables, max_blocks, head_size,
                                             block_size, q_scale, tile);
    CUDA_CHECK_LAUNCH();
  };
  if (head_size % kVec16<T> == 0) {
    run(prefill_attention_kernel<T, kVec16<T>>);
  } else {
    run(prefill_attention_kernel<T, 1>);
  }
}

#define INSTANTIATE(T)                                                                        \
  template void launch_prefill_attention<T>(T*, const T*, const T*, const T*, const int32_t*, \
                                            const int32_t*, const int32_t*, int, int, int, int, \
                                            int, int, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace pagedgpt2::cuda

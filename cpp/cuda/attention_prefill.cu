// Prefill attention: flash-attention style kernels over the paged cache.
//
// float16 / bfloat16 with head size 64 (every GPT-2 size) take the tensor-core kernel: a block
// of 4 warps owns 64 query rows of one (sequence, head), each warp 16 rows whose scores S and
// output O stay in registers (mma.sync m16n8k16, fp32 accumulation, P rounded to the dtype for
// the P V product). K and V tiles of 64 keys are gathered through the block table into shared
// memory with cp.async, the next tile's copies in flight while the current one is computed.
//
// Everything else (float32, other head sizes) takes the CUDA-core kernel, fp32 throughout:
// grid (query tiles, sequences, heads); a block of 128 threads owns kTile query rows of one
// sequence and head, and walks the keys in tiles of kTile through the block table, keeping the
// running max / sum / output of an online softmax in shared memory. Q, K, V tiles are staged as
// float in shared memory (rows padded by one float so the q.k loop is free of bank conflicts).
// NOTE: tile 32 x 32 for D <= 128, 16 x 16 above (shared memory grows with D).
#include <cmath>
#include <type_traits>

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

// ---- tensor-core kernel ---------------------------------------------------------------------

constexpr int kMmaD = 64;        // head size
constexpr int kMmaRows = 64;     // query rows per block, 16 per warp
constexpr int kMmaKeys = 64;     // keys per K/V tile
constexpr int kMmaThreads = 128;
constexpr int kLd = kMmaD + 8;   // shared row stride in elements: 144 bytes, so the 8 rows of an
                                 // ldmatrix hit 8 different 16-byte bank groups
constexpr size_t kMmaSmem = size_t(kMmaRows + 4 * kMmaKeys) * kLd * 2;  // Q, 2 x K, 2 x V

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// c (16 x 8, fp32) += a (16 x 16, row) * b (16 x 8, col), inputs in T.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T, lo in the low 16 bits (the element order of mma fragments).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Fragment coordinates (PTX ISA, mma.m16n8k16): lane l holds, of a 16 x 8 accumulator tile,
// rows l/4 (elements 0, 1) and l/4 + 8 (elements 2, 3), columns 2 (l % 4) + {0, 1}.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    prefill_attention_mma_kernel(T* __restrict__ out,                         // [T, H * D]
                                 const T* __restrict__ qkv,                   // [T, 3 * H * D]
                                 const T* __restrict__ k_cache,               // [blocks, bs, H, D]
                                 const T* __restrict__ v_cache,               // [blocks, bs, H, D]
                                 const int32_t* __restrict__ positions,       // [T]
                                 const int32_t* __restrict__ query_start_loc,  // [S + 1]
                                 const int32_t* __restrict__ block_tables,    // [S, max_blocks]
                                 int max_blocks, int block_size, float q_scale) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* qs = reinterpret_cast<T*>(smem_bytes);  // [kMmaRows][kLd]
  T* ks = qs + kMmaRows * kLd;               // [2][kMmaKeys][kLd]
  T* vs = ks + 2 * kMmaKeys * kLd;           // [2][kMmaKeys][kLd]
  __shared__ int q_pos[kMmaRows];

  const int s = blockIdx.y, h = blockIdx.z;
  const int C = gridDim.z * kMmaD;
  const int q0 = query_start_loc[s] + blockIdx.x * kMmaRows;
  const int q_end = query_start_loc[s + 1];
  if (q0 >= q_end) return;
  const int num_q = min(kMmaRows, q_end - q0);
  const int32_t* table = block_tables + int64_t(s) * max_blocks;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  if (tid < kMmaRows) q_pos[tid] = tid < num_q ? positions[q0 + tid] : -1;
  __syncthreads();
  const int max_pos = __reduce_max_sync(0xffffffffu, max(q_pos[lane], q_pos[lane + 32]));

  // Q rows (zeros past the run), then the K/V tiles: 8 16-byte pieces per 64-element row.
  for (int i = tid; i < kMmaRows * 8; i += kMmaThreads) {
    const int r = i / 8, c = (i % 8) * 8;
    const bool valid = r < num_q;
    cp_async16(qs + r * kLd + c, qkv + int64_t(valid ? q0 + r : q0) * 3 * C + h * kMmaD + c, valid);
  }
  cp_async_commit();
  // Keys past max_pos are zero-filled (never read from the cache): masked scores must meet
  // finite values, or 0 * NaN would poison O.
  auto load_kv = [&](int stage, int k0) {
    T* kd = ks + stage * kMmaKeys * kLd;
    T* vd = vs + stage * kMmaKeys * kLd;
    for (int i = tid; i < kMmaKeys * 8; i += kMmaThreads) {
      const int r = i / 8, c = (i % 8) * 8;
      const int p = k0 + r;
      const bool valid = p <= max_pos;
      const int64_t at = valid ? (int64_t(table[p / block_size]) * block_size + p % block_size) * C +
                                     h * kMmaD + c
                               : 0;
      cp_async16(kd + r * kLd + c, k_cache + at, valid);
      cp_async16(vd + r * kLd + c, v_cache + at, valid);
    }
    cp_async_commit();
  };
  const int num_tiles = max_pos / kMmaKeys + 1;
  load_kv(0, 0);

  cp_async_wait<1>();  // Q is in
  __syncthreads();
  uint32_t qf[4][4];  // A fragments of this warp's 16 rows, k-steps of 16 dims
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    ldmatrix_x4(qf[kk], qs + (warp * 16 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
  }
  const int row = warp * 16 + lane / 4;  // this lane's rows: row and row + 8
  const int pos[2] = {q_pos[row], q_pos[row + 8]};
  float o[8][4] = {};                    // O: 8 tiles of 8 dims
  float m[2] = {-INFINITY, -INFINITY};   // running max (log2 domain)
  float l[2] = {0.f, 0.f};               // running sum of this lane's columns

  for (int t = 0; t < num_tiles; ++t) {
    if (t + 1 < num_tiles) {
      load_kv((t + 1) & 1, (t + 1) * kMmaKeys);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = ks + (t & 1) * kMmaKeys * kLd;
    const T* vt = vs + (t & 1) * kMmaKeys * kLd;
    const int k0 = t * kMmaKeys;

    // S = Q K^T: 8 tiles of 8 keys.
    float sc[8][4] = {};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int kk = 0; kk < 4; kk += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, kt + (j * 8 + lane % 8) * kLd + kk * 16 + (lane / 8) * 8);
        mma_16816<T>(sc[j], qf[kk], b[0], b[1]);
        mma_16816<T>(sc[j], qf[kk + 1], b[2], b[3]);
      }
    }

    // Causal mask, online softmax (a row's 64 scores live on the 4 lanes of a quad).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + 2 * (lane % 4) + (e & 1);
        const float v = key <= pos[e / 2] ? sc[j][e] * q_scale : -INFINITY;
        sc[j][e] = v;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], v);
      }
    }
    float alpha[2], m_new[2], tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      m_new[i] = fmaxf(m[i], tile_max[i]);
      alpha[i] = m_new[i] == -INFINITY ? 1.f : exp2f(m[i] - m_new[i]);  // exp2(-inf) = 0
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2;
        const float p = m_new[i] == -INFINITY ? 0.f : exp2f(sc[j][e] - m_new[i]);
        sc[j][e] = p;
        tile_sum[i] += p;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] = l[i] * alpha[i] + tile_sum[i];
      m[i] = m_new[i];
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
    }

    // O += P V: P's accumulator tiles 2k, 2k + 1 are the A fragment of keys 16k .. 16k + 15.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t a[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                             pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                             pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                             pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < 8; n += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vt + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + n * 8 +
                                 (lane / 16) * 8);
        mma_16816<T>(o[n], a, b[0], b[1]);
        mma_16816<T>(o[n + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration refills the other stage; this one after that
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    l[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row + 8 * i;
    if (r >= num_q) continue;
    T* dst = out + int64_t(q0 + r) * C + h * kMmaD + 2 * (lane % 4);
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(o[n][2 * i] * l[i], o[n][2 * i + 1] * l[i]);
    }
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
  const float q_scale = float(M_LOG2E / std::sqrt(double(head_size)));
  if constexpr (!std::is_same_v<T, float>) {
    if (head_size == kMmaD) {
      auto kernel = prefill_attention_mma_kernel<T>;
      allow_dynamic_smem(kernel, kMmaSmem);
      const dim3 grid(ceil_div(max_query_len, kMmaRows), num_seqs, num_heads);
      kernel<<<grid, kMmaThreads, kMmaSmem, stream>>>(out, qkv, k_cache, v_cache, positions,
                                                      query_start_loc, block_tables, max_blocks,
                                                      block_size, q_scale);
      CUDA_CHECK_LAUNCH();
      return;
    }
  }
  const int tile = tile_for(head_size);
  const size_t smem = smem_floats(tile, head_size) * sizeof(float);
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

// CPU matmul: out[T, N] = in[T, K] @ weight[N, K]^T (+ bias).
//
// Weights are stored [N, K] (nn.Linear layout, as the CUDA backend wants them too), so every
// output is a dot product of two contiguous rows. A register-blocked micro-kernel computes a
// 4 x 2 tile of outputs with 8-wide vector accumulators; threads split the weight rows into
// blocks small enough to stay in L2 while every input row streams past them.
// At decode (T <= 8) the kernel is bound by reading the weights once; at prefill by arithmetic.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/ops.h"

namespace pagedgpt2::cpu {
namespace {

#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kRowsW = 4;  // NR: weight rows per micro-kernel (16 + 4 + 1 of 32 registers)
#else
constexpr int kLanes = 8;
constexpr int kRowsW = 2;  // NR: weight rows per micro-kernel (8 + 2 + 1 of 16 registers)
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));

constexpr int kRowsA = 4;          // MR: input rows per micro-kernel
constexpr int kWeightBlock = 64;   // weight rows per thread task (64 x 768 floats = 192 KiB)

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// out[m, n] for m < mr, n < nr, over K. mr <= kRowsA, nr <= kRowsW (compile-time for unrolling).
template <int MR, int NR>
void micro_kernel(float* out, int ldo, const float* a, const float* w, int K) {
  vf acc[MR][NR] = {};
  int k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load(w + size_t(j) * K + k);
    for (int i = 0; i < MR; ++i) {
      vf av = load(a + size_t(i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += av * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int kk = k; kk < K; ++kk) s += a[size_t(i) * K + kk] * w[size_t(j) * K + kk];
      out[size_t(i) * ldo + j] = s;
    }
  }
}

template <int MR>
void row_tile(float* out, int ldo, const float* a, const float* w, int n_begin, int n_end, int K) {
  int n = n_begin;
  for (; n + kRowsW <= n_end; n += kRowsW) {
    micro_kernel<MR, kRowsW>(out + n, ldo, a, w + size_t(n) * K, K);
  }
  for (; n < n_end; ++n) micro_kernel<MR, 1>(out + n, ldo, a, w + size_t(n) * K, K);
  static_assert(kWeightBlock % kRowsW == 0, "weight blocks are whole micro-kernel tiles");
}

void weight_block(float* out, const float* in, const float* weight, int T, int N, int K,
                  int n_begin, int n_end) {
  int m = 0;
  for (; m + kRowsA <= T; m += kRowsA) {
    row_tile<kRowsA>(out + size_t(m) * N, N, in + size_t(m) * K, weight, n_begin, n_end, K);
  }
  for (; m < T; ++m) row_tile<1>(out + size_t(m) * N, N, in + size_t(m) * K, weight, n_begin, n_end, K);
}

}  // namespace

void matmul(float* out, const float* in, const float* weight, const float* bias, int num_tokens,
            int out_features, int in_features) {
  const int T = num_tokens, N = out_features, K = in_features;
  const int num_tasks = (N + kWeightBlock - 1) / kWeightBlock;
#pragma omp parallel for schedule(static) if (int64_t(T) * N * K > (1 << 16))
  for (int task = 0; task < num_tasks; ++task) {
    int n_begin = task * kWeightBlock;
    int n_end = std::min(N, n_begin + kWeightBlock);
    weight_block(out, in, weight, T, N, K, n_begin, n_end);
    if (bias) {
      for (int m = 0; m < T; ++m) {
        float* row = out + size_t(m) * N;
        for (int n = n_begin; n < n_end; ++n) row[n] += bias[n];
      }
    }
  }
}

}  // namespace pagedgpt2::cpu

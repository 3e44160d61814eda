// Hand-over timer (see ops.h, time_handover): what one dependent stage of a batch-1 decode step
// costs when nothing but its synchronization and its input vector stand in the way.
//
// A round is the shape of a GEMV stage at batch 1: every block gathers the whole input vector x
// [width] (float32) into shared memory, and its warps compute the block's slice of the output
// y [width], y_j = tanh(sum_k c(j, k) x_k / sqrt(width) + x_j / 2), which the next round gathers
// (values stay near 1 in size, so a stale element read would show).
// Only the way a round learns that the vector before is complete differs:
//   kKernel  - a round is a kernel, launched programmatically (the engine's layered step);
//   kBarrier - one cooperative kernel, rounds separated by a grid barrier (a release add and an
//              acquire spin on one counter), then x read from L2;
//   kTagged  - one cooperative kernel, no barrier: every element travels in one 64-bit word with
//              the round that wrote it, and a block re-reads the words of x until all carry the
//              round it waits for (the data is its own flag: one round trip when it is there).
//
// Then the same question with the work in (time_gemv_layers): gpt2's four layer GEMVs (QKV C ->
// 3C, proj C -> C on q, fc C -> 4C with GELU, fc_proj 4C -> C), layer after layer, each layer its
// own fp16 weights, either as the engine's skinny GEMV kernels (programmatic launches) or as one
// persistent kernel: one block an SM, tagged words between stages, and a producer warp that
// bulk-copies each block's rows of every stage through a ring in shared memory, running ahead
// across stages while the consumers wait for x.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/ops.h"
#include "cuda/ops_device.cuh"
#include "cuda/skinny_gemm.cuh"

namespace pagedgpt2::cuda::ops {
namespace {

constexpr int kInFlight = 8;  // words of x a thread loads before it stores any

__device__ __forceinline__ float coefficient(int j, int k) {
  return float((j * 31 + k * 17) % 13 - 6) * 0.25f;
}

// x [width] into xs: load(k) of kInFlight words a thread at once, then their stores; by the
// block's first `threads` threads.
template <class Load>
__device__ __forceinline__ void gather(float* xs, int width, Load load,
                                       int threads = blockDim.x) {
  for (int base = threadIdx.x; base < width; base += kInFlight * threads) {
    float v[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int k = base + i * threads;
      v[i] = k < width ? load(k) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int k = base + i * threads;
      if (k < width) xs[k] = v[i];
    }
  }
}

// This block's outputs, a warp each: emit(j, y_j) for j in [lo, hi) (the caller synced xs).
template <class Emit>
__device__ __forceinline__ void compute_slice(const float* xs, int width, Emit emit) {
  const int lo = int(int64_t(blockIdx.x) * width / gridDim.x);
  const int hi = int(int64_t(blockIdx.x + 1) * width / gridDim.x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const float scale = rsqrtf(float(width));
  for (int j = lo + warp; j < hi; j += warps) {
    float dot = 0.f;
    for (int k = lane; k < width; k += 32) dot += coefficient(j, k) * xs[k];
    dot = warp_sum(dot);
    if (lane == 0) emit(j, tanhf(dot * scale + 0.5f * xs[j]));
  }
}

__global__ void handover_link_kernel(const float* in, float* out, int width) {
  extern __shared__ float xs[];
  pdl_launch_dependents();
  pdl_wait();  // in: the kernel before's output
  gather(xs, width, [&](int k) { return in[k]; });
  __syncthreads();
  compute_slice(xs, width, [&](int j, float y) { out[j] = y; });
}

// bufs [2, width]: round r reads half r % 2 and writes the other.
__global__ void handover_barrier_kernel(float* bufs, unsigned* counter, int width, int rounds) {
  extern __shared__ float xs[];
  for (int r = 0; r < rounds; ++r) {
    const float* in = bufs + (r % 2) * width;
    float* out = bufs + (1 - r % 2) * width;
    if (r > 0) {  // every block's outputs of round r - 1 written
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
        const unsigned target = unsigned(r) * gridDim.x;
        unsigned seen = 0;
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter)
                       : "memory");
        } while (seen < target);
      }
      __syncthreads();
    }
    gather(xs, width, [&](int k) { return __ldcg(in + k); });
    __syncthreads();
    compute_slice(xs, width, [&](int j, float y) { out[j] = y; });
  }
}

__device__ __forceinline__ unsigned long long load_word(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_word(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A word: the round that wrote it (high half), the value's bits (low half). One 64-bit access
// is single-copy atomic, so a reader sees either the old word or the new, never a mix.
__device__ __forceinline__ unsigned long long tagged(unsigned tag, float v) {
  return (static_cast<unsigned long long>(tag) << 32) | __float_as_uint(v);
}

// x [width] into xs from words of the round `want`: N words a thread loaded at once, and those
// not written yet loaded again (together) until every one carries `want`; by the block's first
// `threads` threads.
template <int N = kInFlight>
__device__ __forceinline__ void gather_tagged(float* xs, const unsigned long long* in, int width,
                                              unsigned want, int threads = blockDim.x) {
  for (int base = threadIdx.x; base < width; base += N * threads) {
    unsigned long long w[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int k = base + i * threads;
      w[i] = k < width ? load_word(in + k) : tagged(want, 0.f);
    }
    bool ready;
    do {
      ready = true;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (unsigned(w[i] >> 32) != want) {
          w[i] = load_word(in + base + i * threads);
          ready = false;
        }
      }
    } while (!ready);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int k = base + i * threads;
      if (k < width) xs[k] = __uint_as_float(unsigned(w[i]));
    }
  }
}

// bufs [2, width] words: round r reads half r % 2, whose words carry tag r + 1 once written (the
// host wrote round 0's with tag 1), and writes the other half's with tag r + 2.
__global__ void handover_tagged_kernel(unsigned long long* bufs, int width, int rounds) {
  extern __shared__ float xs[];
  for (int r = 0; r < rounds; ++r) {
    const unsigned long long* in = bufs + (r % 2) * width;
    unsigned long long* out = bufs + (1 - r % 2) * width;
    const unsigned want = unsigned(r) + 1;
    gather_tagged(xs, in, width, want);
    __syncthreads();
    compute_slice(xs, width, [&](int j, float y) { store_word(out + j, tagged(want + 1, y)); });
    __syncthreads();  // xs is gathered again next round
  }
}

// The values of n tagged words on the device (their low halves).
std::vector<float> download_tagged(const unsigned long long* words, int n) {
  std::vector<unsigned long long> w(n);
  CUDA_CHECK(cudaMemcpy(w.data(), words, size_t(n) * 8, cudaMemcpyDeviceToHost));
  std::vector<float> y(n);
  for (int k = 0; k < n; ++k) {
    const unsigned bits = unsigned(w[k]);
    std::memcpy(&y[k], &bits, 4);
  }
  return y;
}

void launch_cooperative(const void* kernel, int blocks, int threads, size_t smem, void** args) {
  CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(threads), args, smem,
                                         kStream));
}

// A chain of `rounds` rounds from x0 of one kind; enqueue() puts it on kStream again (the
// state reset to x0 first), result() gives the vector after the last round.
class HandoverChain {
 public:
  HandoverChain(Handover kind, const float* x0, int width, int blocks_per_sm, int threads,
                int rounds)
      : kind_(kind), width_(width), threads_(threads), rounds_(rounds),
        smem_(size_t(width) * sizeof(float)), floats_(3 * size_t(width)),
        words_(3 * size_t(width)), counter_(1) {
    blocks_ = blocks_per_sm * num_sms();
    const void* kernel = kind == Handover::kKernel    ? (const void*)handover_link_kernel
                         : kind == Handover::kBarrier ? (const void*)handover_barrier_kernel
                                                      : (const void*)handover_tagged_kernel;
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_));
    if (kind != Handover::kKernel && blocks_per_sm > per_sm) {
      throw std::invalid_argument("time_handover: " + std::to_string(blocks_per_sm) +
                                  " blocks an SM of " + std::to_string(threads) +
                                  " threads do not fit at once (at most " +
                                  std::to_string(per_sm) + ")");
    }
    // Slot 2 keeps x0 (floats, and as words of tag 1) for the resets.
    std::vector<unsigned long long> w(width);
    for (int k = 0; k < width; ++k) {
      unsigned bits;
      std::memcpy(&bits, &x0[k], 4);
      w[k] = (1ull << 32) | bits;
    }
    CUDA_CHECK(cudaMemcpy(floats_.get() + 2 * size_t(width), x0, smem_,
                          cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(words_.get() + 2 * size_t(width), w.data(), width * sizeof(w[0]),
                          cudaMemcpyHostToDevice));
  }

  void reset(cudaStream_t stream) const {
    const size_t n = size_t(width_);
    if (kind_ == Handover::kTagged) {
      CUDA_CHECK(cudaMemcpyAsync(words_.get(), words_.get() + 2 * n, n * 8,
                                 cudaMemcpyDeviceToDevice, stream));
      CUDA_CHECK(cudaMemsetAsync(words_.get() + n, 0, n * 8, stream));
    } else {
      CUDA_CHECK(cudaMemcpyAsync(floats_.get(), floats_.get() + 2 * n, n * 4,
                                 cudaMemcpyDeviceToDevice, stream));
      CUDA_CHECK(cudaMemsetAsync(counter_.get(), 0, sizeof(unsigned), stream));
    }
  }

  // Link i of the kernel kind (after a reset at i = 0).
  void launch_link(int i, cudaStream_t stream) const {
    const float* in = floats_.get() + (i % 2) * size_t(width_);
    float* out = floats_.get() + (1 - i % 2) * size_t(width_);
    launch_kernel(handover_link_kernel, dim3(blocks_), dim3(threads_), smem_, stream,
                  /*pdl=*/true, in, out, width_);
  }

  // The barrier or tagged kind: one launch for all rounds (after a reset).
  void launch_rounds() const {
    float* floats = floats_.get();
    unsigned long long* words = words_.get();
    unsigned* counter = counter_.get();
    int width = width_, rounds = rounds_;
    if (kind_ == Handover::kBarrier) {
      void* args[] = {&floats, &counter, &width, &rounds};
      launch_cooperative((const void*)handover_barrier_kernel, blocks_, threads_, smem_, args);
    } else {
      void* args[] = {&words, &width, &rounds};
      launch_cooperative((const void*)handover_tagged_kernel, blocks_, threads_, smem_, args);
    }
  }

  std::vector<float> run_once() const {
    reset(kStream);
    if (kind_ == Handover::kKernel) {
      for (int i = 0; i < rounds_; ++i) launch_link(i, kStream);
    } else {
      launch_rounds();
    }
    CUDA_CHECK(cudaStreamSynchronize(kStream));
    const size_t half = size_t(rounds_ % 2) * width_;
    if (kind_ == Handover::kTagged) return download_tagged(words_.get() + half, width_);
    std::vector<float> y(width_);
    CUDA_CHECK(cudaMemcpy(y.data(), floats_.get() + half, width_ * 4, cudaMemcpyDeviceToHost));
    return y;
  }

  // Median microseconds a round.
  double time(int iters) const {
    if (kind_ == Handover::kKernel) {
      reset(kStream);
      return graph_median_ms(kStream, iters, rounds_,
                             [&](int i, cudaStream_t capture) { launch_link(i, capture); }) *
             1e3;
    }
    return median_ms(kStream, iters, [&] {
             reset(kStream);
             launch_rounds();
           }) * 1e3 / rounds_;
  }

 private:
  Handover kind_;
  int width_, threads_, rounds_, blocks_ = 0;
  size_t smem_;
  DevArray<float> floats_;
  DevArray<unsigned long long> words_;
  DevArray<unsigned> counter_;
};

// ---- gpt2's layer GEMVs, layer after layer ----------------------------------------------------

// Stage kind q of a layer (0 QKV, 1 proj, 2 fc, 3 fc_proj) at width C: its shape, and where its
// weight [N, K], bias [N] and output [N] start inside the layer's (weights 12 C^2 a layer, biases
// and outputs 9 C). proj reads the first C outputs of QKV (its q).
struct LayerStage {
  int N, K;
  int64_t w_offset, b_offset;
};

__host__ __device__ __forceinline__ LayerStage layer_stage(int q, int C) {
  const int64_t C2 = int64_t(C) * C;
  switch (q) {
    case 0: return {3 * C, C, 0, 0};
    case 1: return {C, C, 3 * C2, 3 * C};
    case 2: return {4 * C, C, 4 * C2, 4 * C};
    default: return {C, 4 * C, 8 * C2, 8 * C};
  }
}

// Weight n, k of stage s (4 a layer) as numpy computes it in float32, then rounded to fp16:
// (2 (h >> 28) - 15) * 0.125 * scale, h = (n K + k + s 0x9E3779B9) 2654435761 mod 2^32 (a hash:
// no row repeats another), scale = 1 / sqrt(K) (scale_c at K = C, scale_4c at 4 C: from the
// host, IEEE); bias n: ((5 n + s) mod 11 - 5) * 0.05.
__global__ void layer_weights_kernel(__half* w, __half* b, int C, int layers, float scale_c,
                                     float scale_4c) {
  const int64_t per_layer = 12 * int64_t(C) * C;
  const int64_t total = per_layer * layers;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int l = int(i / per_layer);
    const int64_t r = i - l * per_layer;
    int q = 3;
    while (q > 0 && r < layer_stage(q, C).w_offset) --q;
    const LayerStage st = layer_stage(q, C);
    const int64_t e = r - st.w_offset;
    const int n = int(e / st.K), k = int(e % st.K), s = 4 * l + q;
    const float scale = st.K == C ? scale_c : scale_4c;
    const unsigned h =
        (unsigned(n) * unsigned(st.K) + unsigned(k) + unsigned(s) * 0x9E3779B9u) * 2654435761u;
    w[i] = __float2half_rn(float(2 * int(h >> 28) - 15) * 0.125f * scale);
    if (k == 0) {
      b[l * 9 * int64_t(C) + st.b_offset + n] =
          __float2half_rn(float((5 * n + s) % 11 - 5) * 0.05f);
    }
  }
}

// Bulk copies (TMA, sm_90) into shared memory, completed on an mbarrier.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// An mbarrier whose phase completes after `count` arrivals (and the bytes they announce).
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Thread 0: `bytes` (a multiple of 16, both ends 16-aligned) from src into dst, counted on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes,
                                          unsigned long long* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#endif
}

// Every thread: until the copy of phase `parity` on bar has landed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// The persistent kernel's block: 16 consumer warps and a producer warp that bulk-copies the
// block's rows of every stage, chunk after chunk, into a ring of shared-memory slots, running
// ahead of the consumers across stages (the weights do not wait for any activation).
constexpr int kConsumerWarps = 16;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kLayerThreads = kConsumers + 32;
constexpr int kSlots = 4;
constexpr int kSlotBytes = 48 * 1024;
constexpr int kRingOffset = 128;  // the slots' full and empty mbarriers first
constexpr int kLayerInFlight = 8;  // 512 x 8 words: gpt2's widest x (3,072) in one round trip

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

// This block's rows [lo, hi) of stage s (contiguous in W from w), in chunks of whole rows that
// fit a slot.
struct StageRows {
  int lo, hi, K, rows_per_chunk, chunks;
  const __half* w;
};

__device__ __forceinline__ StageRows stage_rows(const __half* w, int C, int s) {
  const LayerStage st = layer_stage(s % 4, C);
  StageRows r;
  r.lo = int(int64_t(blockIdx.x) * st.N / gridDim.x);
  r.hi = int(int64_t(blockIdx.x + 1) * st.N / gridDim.x);
  r.K = st.K;
  r.rows_per_chunk = kSlotBytes / (2 * st.K);
  r.chunks = (r.hi - r.lo + r.rows_per_chunk - 1) / r.rows_per_chunk;
  r.w = w + (s / 4) * 12 * int64_t(C) * C + st.w_offset + int64_t(r.lo) * st.K;
  return r;
}

// acc[r] += row r of the chunk [rows, K] (in shared memory) . xs, r < rows. The chunk's 16-byte
// vectors are split evenly over the consumer warps (whatever the shape: fc_proj's chunks have 3
// rows at gpt2-xl's width); a warp sums its run row segment by row segment.
__device__ __forceinline__ void chunk_products(const __half* chunk, int rows, int K,
                                               const float* xs, float* acc) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_row = K / 8, vecs = rows * per_row;
  const int v1 = int(int64_t(warp + 1) * vecs / kConsumerWarps);
  for (int v0 = int(int64_t(warp) * vecs / kConsumerWarps); v0 < v1;) {
    const int r = v0 / per_row, end = min(v1, (r + 1) * per_row);
    float a0 = 0.f, a1 = 0.f;
#pragma unroll 2
    for (int v = v0 + lane; v < end; v += 32) {
      const int k = (v - r * per_row) * 8;
      const uint4 bits = *reinterpret_cast<const uint4*>(chunk + int64_t(v) * 8);
      const __half2* h = reinterpret_cast<const __half2*>(&bits);
      const float4 xa = *reinterpret_cast<const float4*>(xs + k);
      const float4 xb = *reinterpret_cast<const float4*>(xs + k + 4);
      const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]);
      const float2 f2 = __half22float2(h[2]), f3 = __half22float2(h[3]);
      a0 += f0.x * xa.x + f0.y * xa.y + f1.x * xa.z + f1.y * xa.w;
      a1 += f2.x * xb.x + f2.y * xb.y + f3.x * xb.z + f3.y * xb.w;
    }
    const float d = warp_sum(a0 + a1);
    if (lane == 0) atomicAdd(&acc[r], d);
    v0 = end;
  }
}

// One launch = layers x 4 stages. outs: the stages' outputs as tagged words (9 C a layer), zeroed
// once; this launch's words carry `epoch` (1, 2, ... one a launch), so no reset between launches.
// Shared memory: the mbarriers, the ring, x [4 C] floats, the stage's row sums [its rows].
__global__ void __launch_bounds__(kLayerThreads)
    persistent_layers_kernel(const __half* w, const __half* b, const float* x0,
                             unsigned long long* outs, int C, int layers, unsigned epoch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* empty = full + kSlots;
  const __half* ring = reinterpret_cast<const __half*>(smem + kRingOffset);
  float* xs = reinterpret_cast<float*>(smem + kRingOffset + kSlots * kSlotBytes);
  float* acc = xs + 4 * C;
  const int stages = 4 * layers;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kSlots; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], kConsumerWarps);
    }
  }
  __syncthreads();
  if (warp == kConsumerWarps) {  // the producer
    if (lane != 0) return;
    for (int s = 0, c = 0; s < stages; ++s) {
      const StageRows sr = stage_rows(w, C, s);
      for (int j = 0; j < sr.chunks; ++j, ++c) {
        const int slot = c % kSlots, use = c / kSlots;
        if (use > 0) mbar_wait(&empty[slot], (use - 1) & 1);  // its last chunk consumed
        const int r0 = j * sr.rows_per_chunk;
        const int r1 = min(sr.hi - sr.lo, r0 + sr.rows_per_chunk);
        bulk_copy(smem + kRingOffset + slot * kSlotBytes, sr.w + int64_t(r0) * sr.K,
                  unsigned(r1 - r0) * sr.K * 2, &full[slot]);
      }
    }
    return;
  }
  for (int s = 0, c = 0; s < stages; ++s) {
    const StageRows sr = stage_rows(w, C, s);
    const LayerStage st = layer_stage(s % 4, C);
    const int rows = sr.hi - sr.lo;
    const int64_t at = (s / 4) * 9 * int64_t(C) + st.b_offset + sr.lo;  // bias and output row 0
    float bias = 0.f;
    if (threadIdx.x < rows) acc[threadIdx.x] = 0.f, bias = __half2float(b[at + threadIdx.x]);
    if (s == 0) {
      gather(xs, sr.K, [&](int k) { return x0[k]; }, kConsumers);
    } else {
      const int p = s - 1;  // the stage before: its outputs, tagged with this epoch
      const int64_t in = (p / 4) * 9 * int64_t(C) + layer_stage(p % 4, C).b_offset;
      gather_tagged<kLayerInFlight>(xs, outs + in, sr.K, epoch, kConsumers);
    }
    consumer_sync();
    for (int j = 0; j < sr.chunks; ++j, ++c) {
      const int slot = c % kSlots;
      mbar_wait(&full[slot], (c / kSlots) & 1);
      const int r0 = j * sr.rows_per_chunk;
      const int r1 = min(rows, r0 + sr.rows_per_chunk);
      chunk_products(ring + slot * (kSlotBytes / 2), r1 - r0, sr.K, xs, acc + r0);
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
    }
    consumer_sync();  // every row's sum is in acc
    if (threadIdx.x < rows) {
      float y = acc[threadIdx.x] + bias;
      if (s % 4 == 2) y = gelu_tanh(y);
      store_word(outs + at + threadIdx.x, tagged(epoch, y));
    }
  }
#else
  __trap();  // sm_90 only (the host checks)
#endif
}

size_t persistent_smem(int C, int sms) {
  const int max_rows = (4 * C + sms - 1) / sms;
  return kRingOffset + size_t(kSlots) * kSlotBytes + size_t(4 * C + max_rows) * sizeof(float);
}

// Throws where the persistent kernel cannot run: before sm_90 (bulk copies), or where x and the
// ring do not fit a block's shared memory.
void check_persistent(int C) {
  int device = 0, major = 0, max_smem = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (major < 9) {
    throw std::invalid_argument("time_gemv_layers: the persistent kernel's bulk copies need "
                                "sm_90 (compute capability " + std::to_string(major) + ")");
  }
  const size_t smem = persistent_smem(C, num_sms());
  if (smem > size_t(max_smem)) {
    throw std::invalid_argument("time_gemv_layers: width " + std::to_string(C) + " needs " +
                                std::to_string(smem / 1024) + " KB of shared memory a block (" +
                                std::to_string(max_smem / 1024) + " KB here)");
  }
}

class LayerChain {
 public:
  LayerChain(int C, int layers, bool persistent)
      : persistent_(persistent), C_(C), layers_(layers), sms_(num_sms()),
        w_(12 * size_t(C) * C * layers),
        b_(9 * size_t(C) * layers), words_(9 * size_t(C) * layers),
        halves_(9 * size_t(C) * layers), x_(size_t(C)), xh_(size_t(C)) {
    layer_weights_kernel<<<1024, 256, 0, kStream>>>(w_.get(), b_.get(), C, layers,
                                                    1.f / std::sqrt(float(C)),
                                                    1.f / std::sqrt(float(4 * C)));
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemsetAsync(words_.get(), 0, 9 * size_t(C) * layers * 8, kStream));
    if (persistent) size_persistent();
  }

  void set_x0(const float* x0) {
    CUDA_CHECK(cudaMemcpy(x_.get(), x0, C_ * sizeof(float), cudaMemcpyHostToDevice));
    std::vector<__half> h(C_);
    for (int k = 0; k < C_; ++k) h[k] = __float2half_rn(x0[k]);
    CUDA_CHECK(cudaMemcpy(xh_.get(), h.data(), C_ * sizeof(__half), cudaMemcpyHostToDevice));
  }

  // All stages once, as persistent (one launch) or as the engine's GEMV kernels.
  void enqueue(cudaStream_t stream) {
    if (persistent_) {
      const __half* w = w_.get();
      const __half* b = b_.get();
      const float* x0 = x_.get();
      unsigned long long* outs = words_.get();
      int C = C_, layers = layers_;
      unsigned epoch = ++epoch_;
      void* args[] = {&w, &b, &x0, &outs, &C, &layers, &epoch};
      CUDA_CHECK(cudaLaunchCooperativeKernel((const void*)persistent_layers_kernel, dim3(sms_),
                                             dim3(kLayerThreads), args, smem_, stream));
      return;
    }
    for (int s = 0; s < 4 * layers_; ++s) {
      const LayerStage st = layer_stage(s % 4, C_);
      const int64_t layer = s / 4;
      SkinnyParams<__half> p;
      if (s == 0) {
        p.x = xh_.get();
      } else {
        const int q = (s - 1) % 4;
        p.x = halves_.get() + (s - 1) / 4 * 9 * int64_t(C_) + layer_stage(q, C_).b_offset;
      }
      p.weight = w_.get() + layer * 12 * int64_t(C_) * C_ + st.w_offset;
      p.bias = b_.get() + layer * 9 * int64_t(C_) + st.b_offset;
      p.out = halves_.get() + layer * 9 * int64_t(C_) + st.b_offset;
      p.rows = 1, p.N = st.N, p.K = st.K;
      launch_skinny_gemm<__half>(p, SkinnyInput::kActivation,
                                 s % 4 == 2 ? SkinnyOutput::kBiasGelu : SkinnyOutput::kBias, sms_,
                                 stream, /*pdl=*/true);
    }
  }

  // The last stage's output (fc_proj of the last layer) after one run.
  std::vector<float> run_once() {
    enqueue(kStream);
    CUDA_CHECK(cudaStreamSynchronize(kStream));
    const int64_t at = (layers_ - 1) * 9 * int64_t(C_) + 8 * int64_t(C_);
    if (persistent_) return download_tagged(words_.get() + at, C_);
    std::vector<__half> h(C_);
    CUDA_CHECK(cudaMemcpy(h.data(), halves_.get() + at, C_ * 2, cudaMemcpyDeviceToHost));
    std::vector<float> y(C_);
    for (int k = 0; k < C_; ++k) y[k] = __half2float(h[k]);
    return y;
  }

  // Median microseconds a layer.
  double time(int iters) {
    if (persistent_) {
      return median_ms(kStream, iters, [&] { enqueue(kStream); }) * 1e3 / layers_;
    }
    const CapturedGraph graph([&](cudaStream_t capture) { enqueue(capture); });
    return median_ms(kStream, iters, [&] { graph.launch(kStream); }) * 1e3 / layers_;
  }

 private:
  // Shared memory of the persistent kernel: the ring, x and the most rows of one stage a block
  // holds.
  void size_persistent() {
    smem_ = persistent_smem(C_, sms_);
    CUDA_CHECK(cudaFuncSetAttribute(persistent_layers_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_)));
  }

  bool persistent_;
  int C_, layers_, sms_;
  size_t smem_ = 0;
  unsigned epoch_ = 0;
  DevArray<__half> w_, b_;
  DevArray<unsigned long long> words_;
  DevArray<__half> halves_;
  DevArray<float> x_;
  DevArray<__half> xh_;
};

// The timers' start vector: sin(0.37 k + 1), no element 0.
std::vector<float> start_vector(int n) {
  std::vector<float> x(n);
  for (int k = 0; k < n; ++k) x[k] = std::sin(0.37f * float(k) + 1.f);
  return x;
}

}  // namespace

double time_handover(Handover kind, int width, int blocks_per_sm, int threads, int rounds,
                     int iters) {
  const std::vector<float> x0 = start_vector(width);
  return HandoverChain(kind, x0.data(), width, blocks_per_sm, threads, rounds).time(iters);
}

std::vector<float> handover_chain(Handover kind, const float* x0, int width, int blocks_per_sm,
                                  int threads, int rounds) {
  return HandoverChain(kind, x0, width, blocks_per_sm, threads, rounds).run_once();
}

double time_gemv_layers(bool persistent, int C, int layers, int iters) {
  if (persistent) check_persistent(C);
  LayerChain chain(C, layers, persistent);
  chain.set_x0(start_vector(C).data());
  return chain.time(iters);
}

std::vector<float> gemv_layers_chain(bool persistent, const float* x0, int C, int layers) {
  if (persistent) check_persistent(C);
  LayerChain chain(C, layers, persistent);
  chain.set_x0(x0);
  return chain.run_once();
}

}  // namespace pagedgpt2::cuda::ops

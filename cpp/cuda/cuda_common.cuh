// Shared helpers of the CUDA backend: error checks, the element types (float, __half,
// __nv_bfloat16) and their conversions, 16-byte vector loads, warp/block reductions and the
// dtype dispatch used by every launcher. No kernels of its own.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/dtype.h"

namespace pagedgpt2::cuda {

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  const std::string msg = std::string("CUDA error: ") + cudaGetErrorString(err) + " (" +
                          cudaGetErrorName(err) + ") in " + expr + " at " + file + ":" +
                          std::to_string(line);
  if (err == cudaErrorMemoryAllocation) throw std::runtime_error("out of GPU memory: " + msg);
  throw std::runtime_error(msg);
}

#define CUDA_CHECK(expr)                                                          \
  do {                                                                            \
    cudaError_t err_ = (expr);                                                    \
    if (err_ != cudaSuccess) {                                                    \
      ::pagedgpt2::cuda::throw_cuda_error(err_, #expr, __FILE__, __LINE__);       \
    }                                                                             \
  } while (0)

// After every kernel launch: catches bad launch configurations at once.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

// Raises a kernel's dynamic shared-memory limit to `bytes` once per (device, kernel), when it
// needs more than the default 48 KB.
inline void allow_dynamic_smem_impl(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::set<std::pair<int, const void*>> done;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (!done.insert({device, kernel}).second) return;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
}

template <class Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  allow_dynamic_smem_impl(reinterpret_cast<const void*>(kernel), bytes);
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte load.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// N consecutive elements moved as one aligned load/store (16 bytes when N = kVec16<T>).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(x.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Vec<T, N> x;
#pragma unroll
  for (int i = 0; i < N; ++i) x.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// The kVec16<T> elements of 16 raw bytes (one uint4 load) as floats. A vector kept raw until
// it is used is not repacked register by register right after its load (a repack makes the
// warp wait for the load there).
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& bits, float (&out)[kVec16<T>]) {
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = __uint_as_float(words[i]);
    } else if constexpr (std::is_same_v<T, __half>) {
      __half2 h;
      memcpy(&h, &words[i], 4);
      const float2 f = __half22float2(h);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    } else {
      __nv_bfloat162 h;
      memcpy(&h, &words[i], 4);
      const float2 f = __bfloat1622float2(h);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  }
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+; no-ops elsewhere and when not launched that way)
// ---------------------------------------------------------------------------------------------

// Blocks until the previous kernel in the stream has finished and its writes are visible. Work
// before it may only touch data no earlier kernel writes (the weights).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel, if launched with programmatic serialization, start its prologue now.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Asks L2 to fetch [ptr, ptr + bytes) from memory and returns at once (no thread waits for
// it). ptr 16-byte aligned. sm_90: one bulk prefetch by thread 0; before: a line a thread.
__device__ __forceinline__ void prefetch_l2(const void* ptr, size_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0 && bytes >= 16) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr),
                 "r"(static_cast<unsigned>(bytes / 16 * 16))
                 : "memory");
  }
#else
  const char* p = static_cast<const char*>(ptr);
  for (size_t i = size_t(threadIdx.x) * 128; i < bytes; i += size_t(blockDim.x) * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + i));
  }
#endif
}

// Memory a kernel asks L2 for on behalf of the kernels after it (their weights); bytes 0: none.
struct L2Range {
  const void* ptr = nullptr;  // 16-byte aligned
  size_t bytes = 0;
};

// Asks L2 for share `block` of `blocks` of range (128-byte-aligned shares; by default this
// block's of a 1-D grid) and returns at once. No thread waits for the data; a later load of it
// hits L2.
__device__ __forceinline__ void prefetch_l2_share(L2Range range, size_t block = blockIdx.x,
                                                  size_t blocks = gridDim.x) {
  if (range.bytes == 0) return;
  const size_t share = (range.bytes / blocks + 127) / 128 * 128;
  const size_t begin = share * block;
  if (begin >= range.bytes) return;
  prefetch_l2(static_cast<const char*>(range.ptr) + begin, min(share, range.bytes - begin));
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization when
// pdl: the kernel may start while the one before it in the stream still runs (it must call
// pdl_wait before touching that kernel's outputs).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// What enqueue() puts on `stream` (not the legacy stream, which cannot be captured), captured
// into a CUDA graph and returned instantiated; the caller destroys the exec.
// NOTE: if enqueue throws, the capture is ended and its graph freed before the exception goes on
// (a capture left open would break every later use of the thread's streams).
template <typename Enqueue>
cudaGraphExec_t capture_graph(cudaStream_t stream, Enqueue&& enqueue) {
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    enqueue();
  } catch (...) {
    cudaStreamEndCapture(stream, &graph);
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_CHECK(err);
  return exec;
}

// What enqueue(stream) launches, captured once into a CUDA graph on a stream of its own, to be
// replayed by launch: for timing chains of launches without the host's per-launch cost.
class CapturedGraph {
 public:
  template <typename Enqueue>
  explicit CapturedGraph(Enqueue&& enqueue) {
    cudaStream_t capture;
    CUDA_CHECK(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
    try {
      exec_ = capture_graph(capture, [&] { enqueue(capture); });
    } catch (...) {
      cudaStreamDestroy(capture);
      throw;
    }
    cudaStreamDestroy(capture);
  }
  ~CapturedGraph() {
    if (exec_) cudaGraphExecDestroy(exec_);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  void launch(cudaStream_t stream) const { CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

// Median milliseconds of `iters` calls of enqueue() on `stream`, each timed with events, after
// one untimed warm-up call. enqueue may return bool: false (the work cannot run here) makes the
// result INFINITY.
template <class Enqueue>
float median_ms(cudaStream_t stream, int iters, Enqueue&& enqueue) {
  auto ran = [&] {
    if constexpr (std::is_same_v<std::invoke_result_t<Enqueue&>, bool>) {
      return enqueue();
    } else {
      enqueue();
      return true;
    }
  };
  if (!ran()) return INFINITY;
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(start, stream));
    const bool ok = ran();
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    if (!ok) break;
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  if (times.empty() || int(times.size()) < iters) return INFINITY;
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Median milliseconds per launch of launch(i, stream) for i < n, captured once into a CUDA graph
// and replayed on `stream` (iters timed replays): a chain of launches timed without the host's
// per-launch cost.
template <class Launch>
float graph_median_ms(cudaStream_t stream, int iters, int n, Launch&& launch) {
  const CapturedGraph graph([&](cudaStream_t capture) {
    for (int i = 0; i < n; ++i) launch(i, capture);
  });
  return median_ms(stream, iters, [&] { graph.launch(stream); }) / n;
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (cp.async, sm_80+)
// ---------------------------------------------------------------------------------------------

// Copies 16 bytes, or writes 16 zero bytes when !valid (src is then not read). Both 16-aligned.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
// Copies 4 bytes (4-aligned) without a register: the thread does not wait for the load.
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A warp writes a row: store(c, value(c)) for c = lane, lane + 32, ... < C, in batches of 8
// whose loads all come before their stores. NOTE: store may write where value reads as far as
// the compiler knows, so one element at a time would wait a memory latency each (10 us a row
// at C = 768 in the embedding gather, ~10 us in the GEMV's LayerNorm prologue).
template <class Value, class Store>
__device__ __forceinline__ void warp_write_row(int C, Value value, Store store) {
  constexpr int kBatch = 8;
  for (int c0 = threadIdx.x % 32; c0 < C; c0 += 32 * kBatch) {
    float v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = c0 + 32 * u;
      v[u] = c < C ? value(c) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (c0 + 32 * u < C) store(c0 + 32 * u, v[u]);
    }
  }
}

// Sum over the block; every thread gets the result. scratch: >= 32 floats of shared memory.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int kWarps = kThreads / 32;
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

template <int kThreads>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  constexpr int kWarps = kThreads / 32;
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch: calls f(T{}) with T the element type of `dtype`.
// ---------------------------------------------------------------------------------------------

template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace pagedgpt2::cuda

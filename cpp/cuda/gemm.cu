// cuBLASLt wrapper: row-major nn.Linear products expressed in cuBLAS's column-major terms, one
// cached plan (descriptors + heuristic algorithm) per shape.
//
// Row-major out[T, N] = in[T, K] @ W[N, K]^T is, column-major, out^T[N, T] = W^T... i.e.
//   D (N x T, ld N) = op(A) (N x K) * B (K x T),  A = W viewed as a K x N column-major matrix
//   (ld K) with op = transpose, B = in viewed as K x T column-major (ld K), bias along D's rows.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/activation.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/gemm.cuh"

namespace pagedgpt2::cuda {
namespace {

#define CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                       \
    cublasStatus_t st_ = (expr);                                                             \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                      \
      throw std::runtime_error(std::string("cuBLASLt error ") + std::to_string(int(st_)) +   \
                               " in " #expr " at " __FILE__ ":" + std::to_string(__LINE__)); \
    }                                                                                        \
  } while (0)

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// How autotune times the candidates: each in a CUDA graph of launches on weights not in L2
// (time_cold), or, with PAGEDGPT2_GEMM_TUNE=hot, as single launches on the real weight (hot in
// L2, launch included), as before the eleventh session; for A/B.
bool tune_hot() {
  const char* v = std::getenv("PAGEDGPT2_GEMM_TUNE");
  return v && std::string(v) == "hot";
}

int row_bucket(int T) {
  int b = 1;
  while (b < T) b *= 2;
  return b;
}

// Algorithms timed by autotune, shared by every engine of the process (they depend on the
// device and the problem, not on the engine): (device, bucket, N, K, dtype, fused epilogue,
// out_fp32, timed hot) -> algorithm.
using TunedKey = std::tuple<int, int, int, int, int, int, bool, bool>;
std::mutex tuned_mutex;
std::map<TunedKey, cublasLtMatmulAlgo_t>& tuned_algos() {
  static std::map<TunedKey, cublasLtMatmulAlgo_t> algos;
  return algos;
}

TunedKey tuned_key(int bucket, int N, int K, DType dtype, int epilogue, bool out_fp32) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  return {device, bucket, N, K, int(dtype), epilogue, out_fp32, tune_hot()};
}

}  // namespace

Gemm::Gemm(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

Gemm::~Gemm() {
  for (auto& kv : plans_) destroy(kv.second);
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

void Gemm::destroy(Plan& p) {
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.c) cublasLtMatrixLayoutDestroy(p.c);
  p = Plan{};
}

bool Gemm::try_make_plan(Plan& p, int T, int N, int K, DType dtype, bool out_fp32,
                         cublasLtEpilogue_t epilogue) {
  const cudaDataType_t ab = cuda_type(dtype);
  const cudaDataType_t cd = out_fp32 ? CUDA_R_32F : ab;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                              sizeof(trans_a)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                              sizeof(trans_b)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                              sizeof(epilogue)));
  if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    // A placeholder: the real bias pointer is set on every call.
    const void* bias = workspace_;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)));
  }
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, ab, K, N, K));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, ab, K, T, K));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, cd, N, T, N));

  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_)));
  // NOTE: every pointer we pass is at least 16-byte aligned (tensors are carved at 256-byte
  // boundaries, rows are K or N elements); promising 16 rather than the default 256 keeps the
  // heuristic honest for sub-buffers.
  const uint32_t align = 16;
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)));
  }
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int found = 0;
  const int wanted = T <= kAutotuneMaxRows ? kCandidates : 1;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c,
                                                           pref, wanted, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    destroy(p);
    return false;
  }
  p.algo = results[0].algo;
  for (int i = 0; found > 1 && i < found; ++i) p.candidates.push_back(results[i].algo);
  return true;
}

Gemm::Plan& Gemm::plan(int bucket, int N, int K, DType dtype, bool out_fp32, Epilogue epilogue) {
  const int T = bucket;
  const Key key{T, N, K, int(dtype), int(epilogue), out_fp32};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  Plan p;
  const cublasLtEpilogue_t fused = epilogue == Epilogue::kBias       ? CUBLASLT_EPILOGUE_BIAS
                                   : epilogue == Epilogue::kBiasGelu ? CUBLASLT_EPILOGUE_GELU_BIAS
                                                                     : CUBLASLT_EPILOGUE_DEFAULT;
  if (try_make_plan(p, T, N, K, dtype, out_fp32, fused)) {
    p.fused = true;
  } else if (epilogue != Epilogue::kNone &&
             try_make_plan(p, T, N, K, dtype, out_fp32, CUBLASLT_EPILOGUE_DEFAULT)) {
    p.fused = false;
  } else {
    throw std::runtime_error("cuBLASLt has no algorithm for a " + std::string(dtype_name(dtype)) +
                             " GEMM of T=" + std::to_string(T) + ", N=" + std::to_string(N) +
                             ", K=" + std::to_string(K));
  }
  p.bucket = p.rows = T;
  if (!p.candidates.empty()) {
    std::lock_guard<std::mutex> lock(tuned_mutex);
    auto it = tuned_algos().find(tuned_key(T, N, K, dtype, p.fused ? int(epilogue) : 0, out_fp32));
    if (it != tuned_algos().end()) {
      p.algo = it->second;
      p.candidates.clear();
    }
  }
  return plans_.emplace(key, p).first->second;
}

// Points the plan's layouts b (K x T) and c (N x T) at T columns.
void Gemm::set_rows(Plan& p, int T) {
  if (p.rows == T) return;
  const uint64_t cols = uint64_t(T);
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(p.b, CUBLASLT_MATRIX_LAYOUT_COLS, &cols,
                                                sizeof(cols)));
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(p.c, CUBLASLT_MATRIX_LAYOUT_COLS, &cols,
                                                sizeof(cols)));
  p.rows = T;
}

// The bucket's algorithm does not run at p.rows rows: asks the heuristic for that exact shape.
cublasStatus_t Gemm::run_fallback(Plan& p, void* out, const void* in, const void* weight,
                                  cudaStream_t stream) {
  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_)));
  cublasLtMatmulHeuristicResult_t result = {};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c,
                                                           pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (found == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  return run(p, result.algo, out, in, weight, stream);
}

cublasStatus_t Gemm::run(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* out,
                         const void* in, const void* weight, cudaStream_t stream) {
  const float alpha = 1.f, beta = 0.f;
  return cublasLtMatmul(handle_, p.desc, &alpha, weight, p.a, in, p.b, &beta, out, p.c, out, p.c,
                        &algo, workspace_, workspace_bytes_, stream);
}

// One launch of `algo` on the real buffers (weight hot in L2 after the first; launch included).
float Gemm::time_hot(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* out, const void* in,
                     const void* weight, cudaStream_t stream) {
  return median_ms(stream, 5, [&] {
    return run(p, algo, out, in, weight, stream) == CUBLAS_STATUS_SUCCESS;
  });
}

// One launch of `algo` within a CUDA graph of launches, each on its own copy of the weight
// (enough copies that none is in L2 when its turn comes, as in a model step, where the other
// layers' weights and the KV cache pass through L2 in between).
float Gemm::time_cold(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* out, const void* in,
                      const char* weights, size_t weight_bytes, int copies, cudaStream_t stream) {
  if (run(p, algo, out, in, weights, stream) != CUBLAS_STATUS_SUCCESS) return INFINITY;
  return graph_median_ms(stream, 5, copies, [&](int c, cudaStream_t capture) {
    run(p, algo, out, in, weights + size_t(c) * weight_bytes, capture);
  });
}

// Times each candidate and keeps the fastest: time_cold on copies of the weight (192 MB or
// more in all, at most 64, allocated for the timing only), or, with PAGEDGPT2_GEMM_TUNE=hot or
// when they do not fit, single launches on the real buffers (median of 5 after a warm-up).
// NOTE: H200, gpt2: timed cold, batch 8 15,888 -> 16,358 tok/s, batch 64 +1%, batch 256 alike
// in one call and +5% in another (notes.md, eleventh session). Hot timing reads the weight from
// L2, which a step never does, and its few-us launch is as large as the differences it is asked
// to tell apart.
// Skipped while the stream is being captured into a graph: the first eager call tunes.
void Gemm::autotune(Plan& p, void* out, const void* in, const void* weight, size_t weight_bytes,
                    cudaStream_t stream) {
  cudaStreamCaptureStatus capturing;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (capturing != cudaStreamCaptureStatusNone) return;
  const int copies =
      int(std::min<size_t>(64, ((size_t(192) << 20) + weight_bytes - 1) / weight_bytes));
  char* weights = nullptr;
  if (!tune_hot() && cudaMalloc(&weights, copies * weight_bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // no room for the copies: time on the real weight
    weights = nullptr;
  }
  for (int c = 0; weights && c < copies; ++c) {
    CUDA_CHECK(cudaMemcpyAsync(weights + size_t(c) * weight_bytes, weight, weight_bytes,
                               cudaMemcpyDeviceToDevice, stream));
  }
  float best_ms = INFINITY;
  for (const cublasLtMatmulAlgo_t& algo : p.candidates) {
    const float ms = weights ? time_cold(p, algo, out, in, weights, weight_bytes, copies, stream)
                             : time_hot(p, algo, out, in, weight, stream);
    if (ms < best_ms) best_ms = ms, p.algo = algo;
  }
  if (weights) {
    CUDA_CHECK(cudaStreamSynchronize(stream));
    CUDA_CHECK(cudaFree(weights));
  }
  p.candidates.clear();
}

void Gemm::matmul(void* out, const void* in, const void* weight, const void* bias, int T, int N,
                  int K, DType dtype, bool out_fp32, Epilogue epilogue, cudaStream_t stream) {
  if (T <= 0) return;
  if (!bias && epilogue != Epilogue::kNone) {
    throw std::invalid_argument("Gemm::matmul: a bias epilogue needs a bias");
  }
  Plan& p = plan(row_bucket(T), N, K, dtype, out_fp32, epilogue);
  set_rows(p, T);
  if (p.fused && epilogue != Epilogue::kNone) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)));
  }
  if (!p.candidates.empty()) {
    autotune(p, out, in, weight, size_t(N) * K * dtype_size(dtype), stream);
    if (p.candidates.empty()) {  // timed now (not while capturing): keep it for every engine
      std::lock_guard<std::mutex> lock(tuned_mutex);
      tuned_algos()[tuned_key(p.bucket, N, K, dtype, p.fused ? int(epilogue) : 0, out_fp32)] =
          p.algo;
    }
  }
  cublasStatus_t st = run(p, p.algo, out, in, weight, stream);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED && p.rows != p.bucket) {
    st = run_fallback(p, out, in, weight, stream);
  }
  CUBLAS_CHECK(st);
  if (!p.fused && epilogue != Epilogue::kNone) {
    if (out_fp32) throw std::logic_error("Gemm::matmul: no bias epilogue on float32 logits");
    dispatch_dtype(dtype, [&](auto tag) {
      using T_ = decltype(tag);
      launch_bias_act<T_>(static_cast<T_*>(out), static_cast<const T_*>(bias), T, N,
                          epilogue == Epilogue::kBiasGelu, stream);
    });
  }
}

}  // namespace pagedgpt2::cuda

// cuBLASLt GEMMs of the wide path (prefill and large decode batches): out = in @ W^T (+ bias)
// (then tanh-GELU), W stored [N, K] as nn.Linear does. fp32 accumulation always; for float32
// the compute type is CUBLAS_COMPUTE_32F (true fp32, no TF32) so fp32 logits match the CPU/HF.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "cuda/dtype.h"

namespace pagedgpt2::cuda {

enum class Epilogue { kNone, kBias, kBiasGelu };

constexpr int kAutotuneMaxRows = 512;

class Gemm {
 public:
  explicit Gemm(size_t workspace_bytes = 32u << 20);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // out[T, N] = epilogue(in[T, K] @ weight[N, K]^T + bias[N]).
  // in, weight, bias are `dtype`; out is `dtype`, or float32 when out_fp32 (the LM head).
  // NOTE: the bias and GELU run in cuBLASLt's epilogue (its GELU is the tanh approximation GPT-2
  // uses); when the heuristic finds no algorithm with that epilogue, a plain GEMM runs and
  // launch_bias_act finishes the job. Graph-capturable: no allocation after the first call of a
  // shape (plans are cached; the workspace is fixed).
  // NOTE: plans are made per row bucket (T rounded up to a power of two; a call sets the
  // layouts' column count to its T), so steps of ever-changing T (mixed prefill and decode)
  // reuse them. For decode-sized buckets (<= kAutotuneMaxRows) the heuristic's best few
  // algorithms are timed on the first eager call (as a step meets them: weights not in L2) and
  // the fastest kept, for every engine of the process: its first pick is sometimes several
  // times slower (an sm_75 kernel for the fp16 x fp16 -> fp32 LM head, seen on an H200).
  void matmul(void* out, const void* in, const void* weight, const void* bias, int T, int N,
              int K, DType dtype, bool out_fp32, Epilogue epilogue, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's best few, until timed
    bool fused = false;  // the epilogue runs inside cuBLASLt
    int bucket = 0;      // rows the plan was made for
    int rows = 0;        // rows the layouts b and c describe now (<= bucket)
  };
  using Key = std::tuple<int, int, int, int, int, bool>;  // bucket, N, K, dtype, epilogue, out_fp32

  Plan& plan(int bucket, int N, int K, DType dtype, bool out_fp32, Epilogue epilogue);
  void set_rows(Plan& p, int T);
  cublasStatus_t run_fallback(Plan& p, void* out, const void* in, const void* weight,
                              cudaStream_t stream);
  bool try_make_plan(Plan& p, int T, int N, int K, DType dtype, bool out_fp32,
                     cublasLtEpilogue_t epilogue);
  static void destroy(Plan& p);
  cublasStatus_t run(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* out, const void* in,
                     const void* weight, cudaStream_t stream);
  void autotune(Plan& p, void* out, const void* in, const void* weight, size_t weight_bytes,
                cudaStream_t stream);
  float time_hot(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* out, const void* in,
                 const void* weight, cudaStream_t stream);
  float time_cold(const Plan& p, const cublasLtMatmulAlgo_t& algo, void* out, const void* in,
                  const char* weights, size_t weight_bytes, int copies, cudaStream_t stream);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_;
  std::map<Key, Plan> plans_;
};

}  // namespace pagedgpt2::cuda

// The CUDA backend's model: owns the GPU, the weights, the KV pool, the activation buffers and the
// CUDA graphs, and sequences the kernels of one step.
//
// Memory, all allocated in the constructor, never per step:
//   weights     one allocation, each tensor at a 256-byte boundary, in T (LayerNorm params fp32)
//   activations one allocation sized for max_num_batched_tokens rows
//   KV pool     one allocation [L, 2, num_blocks, block_size, H, D] (K then V per layer)
//   step inputs one pinned host buffer + its device twin: every int array of a step is packed on
//               the host and crosses in one cudaMemcpyAsync; sampled ids come back in one copy.
//
// Two ways through the layers (chosen per step):
//   skinny (T <= skinny_max_rows_, 2: decode at batch 1-2 by default): 5 launches per layer,
//     LayerNorm / bias / GELU / residual / write_kv fused into weight-streaming GEMVs
//     (skinny_gemm.cuh);
//   wide (prefill, larger batches): cuBLASLt GEMMs with bias(+GELU) epilogues, write_kv,
//     add+LayerNorm kernels.
// Attention: the leading one-token sequences of a step take the decode kernel, the prompt chunks
// after them the prefill kernel.
// Decode steps (every sequence has one new token) are padded to a batch bucket (1, 2, 4, ...,
// max_num_seqs) and replayed from a CUDA graph holding the whole step: embedding, layers, LM
// head, sampling and the download of the ids (the upload goes just before). Padding rows have
// slot -1 and context_len 0, which every kernel skips. Each bucket's sampling graph is captured at
// start-up from an all-padding step: the step runs once eagerly (warming cuBLASLt plans and
// kernel attributes), the graph is captured from the same enqueue code, then replayed.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/activation.cuh"
#include "cuda/advance_step.cuh"
#include "cuda/attention_decode.cuh"
#include "cuda/attention_prefill.cuh"
#include "cuda/copy_blocks.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_model.h"
#include "cuda/embedding.cuh"
#include "cuda/gemm.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/sampling.cuh"
#include "cuda/skinny_gemm.cuh"
#include "cuda/write_kv.cuh"
#include "engine/layer_weights.h"

namespace pagedgpt2::cuda {
namespace {

constexpr size_t kAlign = 256;
// Wide steps of at most this many tokens ask L2 for the next GEMM's weights (l2_lookahead_).
constexpr int kWidePrefetchMaxRows = 16;
// A decode run replays graphs for up to this many steps (more: one by one).
constexpr int kMaxDecodeSteps = 64;
constexpr int kRunsInFlight = 2;  // decode runs launched and not waited for (Model's limit)

size_t align_up(size_t n, size_t a = kAlign) { return (n + a - 1) / a * a; }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ---------------------------------------------------------------------------------------------
// Owning buffers
// ---------------------------------------------------------------------------------------------

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, const char* what) { reset(bytes, what); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void reset(size_t bytes, const char* what) {
    release();
    if (bytes == 0) return;
    const cudaError_t err = cudaMalloc(&ptr_, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state
      ptr_ = nullptr;
      throw std::runtime_error(std::string("out of GPU memory: cannot allocate ") +
                               std::to_string(bytes >> 20) + " MiB for " + what + " (" +
                               cudaGetErrorString(err) + ")");
    }
    bytes_ = bytes;
  }
  char* get() const { return static_cast<char*>(ptr_); }
  size_t size() const { return bytes_; }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void reset(size_t bytes) {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    CUDA_CHECK(cudaMallocHost(&ptr_, std::max<size_t>(bytes, 16)));
  }
  char* get() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
};

// Carves 256-byte-aligned pieces out of one allocation: plan with take() on a null base, then
// allocate and walk again.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <class P>
  P* take(size_t bytes) {
    P* p = reinterpret_cast<P*>(base_ ? base_ + offset_ : nullptr);
    offset_ += align_up(bytes);
    return p;
  }
  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

template <typename T>
__global__ void convert_kernel(T* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = from_float<T>(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Step inputs: packed layout (offsets into the pinned buffer and its device twin)
// ---------------------------------------------------------------------------------------------

struct StepLayout {
  int T = 0, S = 0, R = 0, width = 0;
  bool sampling = false;
  size_t token_ids, positions, slot_mapping, query_start_loc, context_lens, block_tables,
      logits_indices, temperature, top_k, top_p, seeds, counters, bytes;
};

StepLayout make_layout(int T, int S, int R, int width, bool sampling) {
  StepLayout l;
  l.T = T, l.S = S, l.R = R, l.width = width, l.sampling = sampling;
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o += align_up(bytes, 16);
    return at;
  };
  l.token_ids = take(4 * size_t(T));
  l.positions = take(4 * size_t(T));
  l.slot_mapping = take(4 * size_t(T));
  l.query_start_loc = take(4 * size_t(S + 1));
  l.context_lens = take(4 * size_t(S));
  l.block_tables = take(4 * size_t(S) * width);
  l.logits_indices = take(4 * size_t(R));
  const size_t rs = sampling ? size_t(R) : 0;
  l.temperature = take(4 * rs);
  l.top_k = take(4 * rs);
  l.top_p = take(4 * rs);
  l.seeds = take(8 * rs);
  l.counters = take(8 * rs);
  l.bytes = o;
  return l;
}

// What the kernels of one step see: device pointers into the uploaded inputs, plus the shape
// decisions made on the host.
struct Step {
  StepLayout layout;
  bool skinny = false;        // layers take the skinny path
  // Sequences [0, num_decode_seqs) have one new token each (token row = sequence index): their
  // attention runs in the decode kernel, the rest in the prefill kernel.
  int num_decode_seqs = 0;
  int max_context_len = 0;    // bound on the decode sequences' context_lens (decode grid)
  int max_query_len = 0;      // longest query run of the other sequences (prefill grid)
  int partition_size = 0;     // decode attention: tokens per thread block ...
  int heads_per_block = 1;    // ... and heads
  // Skinny steps of decode rows only: the proj GEMV merges decode attention's partitions
  // (SkinnyInput::kAttentionPartials) where skinny_merges_attention allows it.
  bool merge_in_proj = false;
  // Graph steps that sample: every row is greedy (temperature 0), padding rows included.
  bool all_greedy = false;
  const int32_t *token_ids, *positions, *slot_mapping, *query_start_loc, *context_lens,
      *block_tables, *logits_indices;
  DeviceSampling sampling;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// The engine, templated on the element type
// ---------------------------------------------------------------------------------------------

struct CudaModel::Impl {
  virtual ~Impl() = default;
  virtual void forward(const StepInputs& in, float* logits) = 0;
  virtual void forward_and_sample(const StepInputs& in, const SamplingInputs& s,
                                  int32_t* next_tokens) = 0;
  // Model::enqueue_decode_run / wait_decode_run: a run of graph replays that the host does not
  // wait for (false when these steps cannot replay a graph: the caller runs them one by one).
  virtual bool enqueue_decode_run(const StepInputs& in, const SamplingInputs& s, int num_steps,
                                  const int32_t* slot_mappings, bool continue_run) = 0;
  virtual void wait_decode_run(int32_t* next_tokens) = 0;
  virtual void copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) = 0;

  ModelConfig cfg;
  DType dtype = DType::kFloat16;
  int device = 0;
  int num_blocks = 0;
  int block_size = 0;
  int64_t kv_bytes_per_block = 0;
  std::string device_name;
  bool use_graphs = true;
  int num_graphs = 0;
};

namespace {

template <typename T>
class Engine final : public CudaModel::Impl {
 public:
  Engine(const ModelConfig& config, const HostWeights& weights, DType dt, int num_blocks_arg,
         int block_size_arg, double gpu_memory_fraction, int device_index, int max_num_seqs,
         int max_num_batched_tokens);
  ~Engine() override;

  void forward(const StepInputs& in, float* logits) override;
  void forward_and_sample(const StepInputs& in, const SamplingInputs& s,
                          int32_t* next_tokens) override;
  bool enqueue_decode_run(const StepInputs& in, const SamplingInputs& s, int num_steps,
                          const int32_t* slot_mappings, bool continue_run) override;
  void wait_decode_run(int32_t* next_tokens) override;
  void copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) override;

 private:
  using Layer = LayerWeights<T>;

  void upload_weights(const HostWeights& weights);
  void fold_layernorms();
  void allocate_activations();
  void warm_up_gemms();
  void allocate_kv_pool(int num_blocks_arg, double gpu_memory_fraction);
  void capture_decode_graphs();

  T* k_cache(int l) const { return reinterpret_cast<T*>(kv_pool_.get() + (2 * l) * cache_bytes_); }
  T* v_cache(int l) const {
    return reinterpret_cast<T*>(kv_pool_.get() + (2 * l + 1) * cache_bytes_);
  }

  // Step preparation (host).
  void check_inputs(const StepInputs& in) const;
  bool is_decode(const StepInputs& in) const;
  int bucket_for(int num_seqs) const;
  Step pack_eager(const StepInputs& in, const SamplingInputs* s);
  Step pack_graph(const StepInputs& in, const SamplingInputs* s, int bucket);
  Step make_step(const StepLayout& layout, int num_decode_seqs, int max_context_len,
                 int max_query_len);

  // Enqueue (device, on stream_; also what graphs capture).
  void enqueue_upload(const Step& st);
  void enqueue_embedding(const Step& st);
  void enqueue_layers(const Step& st, bool embed = true);
  void enqueue_skinny_layer(const Step& st, int l);  // layer l by the skinny GEMVs
  void enqueue_wide_layer(const Step& st, int l);    // layer l by cuBLASLt and our kernels
  void enqueue_attention(const Step& st, T* k, T* v, L2Range prefetch = {},
                         bool merge_later = false);
  // LM head on rows [r0, r0 + rows) into logits_ (float32), or into logits_t_ (T, rows of
  // padded_vocab()) for sampling in fp16/bf16 models; returns whether it was logits_t_. exact:
  // float32 output for every dtype.
  // argmax: the LM head's SkinnyParams::argmax (greedy_in_lm_head steps).
  bool enqueue_logits(const Step& st, int r0, int rows, bool exact,
                      unsigned long long* argmax = nullptr);
  // Whether the LM head over `rows` rows is the skinny GEMV (else cuBLASLt).
  bool skinny_lm_head(int rows) const {
    return rows <= skinny_max_rows_ && skinny_gemm_supported(rows, C_);
  }
  void enqueue_sample(const Step& st, int r0, int rows, bool half_logits);
  // The wide path's cuBLASLt GEMMs over n rows (warm_up_gemms makes their plans).
  void gemm_qkv(const Layer& w, int n);      // ln_out_ -> qkv_
  void gemm_proj(const Layer& w, int n);     // attn_ -> tmp_
  void gemm_fc(const Layer& w, int n);       // ln_out_ -> mlp_ (GELU)
  void gemm_fc_proj(const Layer& w, int n);  // mlp_ -> tmp_
  bool gemm_lm_head(int rows, bool exact);   // final_x_ -> logits_ or logits_t_ (as above)
  // The step's layers, then, logits_rows_ rows at a time, the LM head and either sampling or
  // the download of the float32 logits into logits_host (nullptr: left in logits_, as a graph
  // leaves them); sampled ids are downloaded into tokens_host_, or with
  // advance (a decode run's step with a step after it) turned into the next step's inputs.
  // embed false: residual_ already holds the step's x (graph_embeds).
  void enqueue_forward(const Step& st, bool sample, float* logits_host, bool advance = false,
                       bool embed = true);

  // after_advance: the step before was this run's and advanced the inputs on the GPU (writing x
  // too, where the graph leaves the embedding out: graph_embeds).
  void launch_decode_graph(const Step& st, bool sample, bool advance = false,
                           bool after_advance = false);
  void run(const StepInputs& in, const SamplingInputs* s, float* logits, int32_t* next_tokens);

  cudaStream_t stream_ = nullptr;
  int num_sms_ = 0;
  bool pdl_ = false;  // programmatic dependent launch of the skinny GEMVs (sm_90+)
  // Steps of at most this many tokens take the skinny GEMVs, larger ones cuBLASLt.
  // NOTE: 2, measured (gpt2, H200): batch 2 0.46 ms a step with the GEMVs against 0.51 with
  // cuBLASLt, batch 4 0.63 against 0.52, batch 8 0.87 against 0.53. PAGEDGPT2_SKINNY_MAX_ROWS
  // (0-8) overrides it, for such measurements.
  int skinny_max_rows_ = 2;
  // Each GEMV of a skinny step asks L2 for this many bytes of the weights after its own, so
  // that the next GEMV's first loads hit L2 (l2_ahead); in wide steps of up to
  // kWidePrefetchMaxRows tokens our kernels before each cuBLASLt GEMM but fc_proj ask for its
  // first bytes. NOTE: 4 MiB, measured (H200): batch 1 gpt2-xl 2.69 -> 2.48 ms a step, gpt2
  // 0.41 -> 0.38; batch 8 gpt2-xl 2.75 -> 2.65; 8 MiB gained less, 16 none, 32 lost; batch 64
  // gained nothing, batch 256 lost in one run (docs/notes.md, eighth session). Again in the
  // thirty-fourth, gpt2-xl batch 1: 4 MiB 628 tok/s, 2 MiB 630, 0 613, 8 MiB 608.
  // PAGEDGPT2_L2_PREFETCH_MB overrides it (0: off).
  size_t l2_lookahead_ = size_t(4) << 20;
  // Wide steps: decode attention writes the decode rows' K/V (write_kv takes only the prompt
  // rows). PAGEDGPT2_ATTENTION_WRITES_KV=0 leaves every row to write_kv, for comparison.
  bool attention_writes_kv_ = true;
  // Skinny decode steps: the proj GEMV merges decode attention's partitions (Step::merge_in_proj).
  // PAGEDGPT2_MERGE_IN_PROJ=0 leaves the merge to the attention kernel, for comparison.
  bool merge_in_proj_ = true;
  // Decode-run steps with a step after them whose rows are all greedy and whose LM head is the
  // skinny GEMV: the LM head reduces each row's greedy token as it writes the logits (into
  // greedy_keys_) and the advance takes it from there; no sampler kernel. NOTE: H200, gpt2
  // batch 1: the sampler and the hand-over to it took ~4.7 us of a 0.230 ms step.
  // PAGEDGPT2_GREEDY_IN_LM_HEAD=0 keeps the sampler, for comparison.
  bool greedy_in_lm_head_ = true;
  bool greedy_in_lm_head(const Step& st, bool sample, bool advance) const;
  // Skinny decode graphs leave the embedding out: the advance of the step before writes their
  // x (NextEmbedding), or, for inputs uploaded by the host, an embedding launched before the
  // graph. NOTE: H200, gpt2 batch 1: the embedding kernel took 3.0 us of a step's critical path
  // (gpt2-xl 8.0; one warp a row), between the graph's start and the first GEMV's wait.
  // PAGEDGPT2_EMBED_IN_ADVANCE=0 keeps it in every graph, for comparison.
  bool embed_in_advance_ = true;
  // Batch-1 layer GEMVs as resident blocks where the shape allows (SkinnyParams::resident:
  // gpt2's and gpt2-medium's, 16-bit types). PAGEDGPT2_RESIDENT_GEMV=0 runs the streaming
  // kernels instead, for comparison.
  bool resident_gemv_ = true;
  bool graph_embeds(const Step& st) const { return !(embed_in_advance_ && st.skinny); }
  L2Range l2_ahead(const void* weight_end) const;
  Gemm gemm_;
  int C_, I_, V_, H_, D_, L_, P_;
  float eps_;
  int max_blocks_;   // ceil(n_positions / block_size): block-table width of graph steps
  int max_tokens_;   // max_num_batched_tokens
  int max_seqs_;     // sequences per step (>= max_num_seqs)
  int logits_rows_;  // rows of logits computed at once (LM head chunk)
  // V rounded up to a multiple of 8: wte's rows on the GPU and the half-precision LM head's N.
  int padded_vocab() const { return (V_ + 7) / 8 * 8; }
  std::vector<int> buckets_;

  DeviceBuffer weights_;
  const T* wte_ = nullptr;       // [V, C]
  const T* wpe_ = nullptr;       // [P, C]
  const float* ln_f_w_ = nullptr;  // [C]
  const float* ln_f_b_ = nullptr;  // [C]
  std::vector<Layer> layers_;
  // The LayerNorms before the skinny GEMVs, folded into them (SkinnyParams::ln_fold): [2, 3C]
  // for ln_1 + QKV and [2, I] for ln_2 + fc in each layer, [2, V] for ln_f + the LM head.
  DeviceBuffer ln_folds_;
  std::vector<const float*> qkv_folds_, fc_folds_;
  const float* lm_head_fold_ = nullptr;

  DeviceBuffer activations_;
  float* residual_ = nullptr;      // [max_tokens, C] fp32 residual stream
  T* ln_out_ = nullptr;            // [max_tokens, C]
  T* qkv_ = nullptr;               // [max_tokens, 3C]
  T* attn_ = nullptr;              // [max_tokens, C]
  T* tmp_ = nullptr;               // [max_tokens, C]
  T* mlp_ = nullptr;               // [max_tokens, I]
  T* final_x_ = nullptr;           // [logits_rows, C]
  float* logits_ = nullptr;        // [logits_rows, V]
  T* logits_t_ = nullptr;  // [logits_rows, padded_vocab] half-precision LM head (T != float)
  int32_t* next_tokens_ = nullptr; // [max_tokens]
  // [max_seqs]: the LM head's greedy keys (SkinnyParams::argmax); zero between steps (the
  // advance that reads them resets them).
  unsigned long long* greedy_keys_ = nullptr;
  char* step_dev_ = nullptr;       // packed step inputs (device twin of step_host_)
  DecodeWorkspace decode_ws_;
  size_t step_bytes_ = 0;

  PinnedBuffer step_host_;    // packed step inputs
  PinnedBuffer tokens_host_;  // [max_tokens] sampled ids
  // Multi-step decode runs: slots of steps 1.. and the ids every step sampled, in rows of the
  // run's bucket, and how many steps the run has advanced (advance_step.cuh).
  int32_t* step_slots_ = nullptr;     // [kMaxDecodeSteps, bucket] device
  int32_t* token_history_ = nullptr;  // [kMaxDecodeSteps, bucket] device
  int32_t* run_step_ = nullptr;       // [1] device
  PinnedBuffer step_slots_host_;
  // Runs the host has not waited for (at most kRunsInFlight): each downloads its ids into its
  // own pinned buffer and records its event after. step_host_ and step_slots_host_ are written
  // again only once uploads_read_ (recorded after a run's uploads) has passed.
  struct RunInFlight {
    int num_steps, num_seqs, buffer;  // its rows are bucket_for(num_seqs) wide
  };
  std::deque<RunInFlight> runs_;
  PinnedBuffer token_history_host_[kRunsInFlight];
  cudaEvent_t run_done_[kRunsInFlight] = {};
  cudaEvent_t uploads_read_ = nullptr;
  // next_tokens_ holds the last step of the newest run, for a run that continues it.
  bool next_tokens_from_run_ = false;
  void wait_uploads_read() const { CUDA_CHECK(cudaEventSynchronize(uploads_read_)); }

  DeviceBuffer kv_pool_;
  size_t cache_bytes_ = 0;  // one layer's K (or V): num_blocks * block_size * C * sizeof(T)

  // (bucket, sample, advance, greedy_in_lm_head) -> graph
  std::map<std::tuple<int, bool, bool, bool>, cudaGraphExec_t> graphs_;
};

template <typename T>
Engine<T>::Engine(const ModelConfig& config, const HostWeights& weights, DType dt,
                  int num_blocks_arg, int block_size_arg, double gpu_memory_fraction,
                  int device_index, int max_num_seqs, int max_num_batched_tokens) {
  cfg = config;
  dtype = dt;
  device = device_index;
  block_size = block_size_arg;
  C_ = cfg.n_embd, I_ = cfg.n_inner, V_ = cfg.vocab_size, H_ = cfg.n_head;
  D_ = cfg.head_size(), L_ = cfg.n_layer, P_ = cfg.n_positions;
  eps_ = cfg.layer_norm_epsilon;
  max_blocks_ = ceil_div(P_, block_size);
  max_tokens_ = max_num_batched_tokens;
  max_seqs_ = std::max(max_num_seqs, 256);
  logits_rows_ = std::min(max_tokens_, std::max(max_num_seqs, 64));

  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  num_sms_ = prop.multiProcessorCount;
  const char* pdl_env = std::getenv("PAGEDGPT2_PDL");
  pdl_ = prop.major >= 9 && !(pdl_env && std::string(pdl_env) == "0");
  if (const char* rows_env = std::getenv("PAGEDGPT2_SKINNY_MAX_ROWS")) {
    skinny_max_rows_ = std::clamp(std::atoi(rows_env), 0, kSkinnyMaxRows);
  }
  if (const char* mb = std::getenv("PAGEDGPT2_L2_PREFETCH_MB")) {
    l2_lookahead_ = size_t(std::max(std::atoi(mb), 0)) << 20;
  }
  if (const char* fused = std::getenv("PAGEDGPT2_ATTENTION_WRITES_KV")) {
    attention_writes_kv_ = std::string(fused) != "0";
  }
  if (const char* merge = std::getenv("PAGEDGPT2_MERGE_IN_PROJ")) {
    merge_in_proj_ = std::string(merge) != "0";
  }
  if (const char* greedy = std::getenv("PAGEDGPT2_GREEDY_IN_LM_HEAD")) {
    greedy_in_lm_head_ = std::string(greedy) != "0";
  }
  if (const char* embed = std::getenv("PAGEDGPT2_EMBED_IN_ADVANCE")) {
    embed_in_advance_ = std::string(embed) != "0";
  }
  if (const char* resident = std::getenv("PAGEDGPT2_RESIDENT_GEMV")) {
    resident_gemv_ = std::string(resident) != "0";
  }
  device_name = "cuda:" + std::to_string(device) + " (" + prop.name + ")";
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  for (cudaEvent_t& e : run_done_) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&uploads_read_, cudaEventDisableTiming));

  for (int b = 1; b < max_num_seqs; b *= 2) buckets_.push_back(b);
  buckets_.push_back(max_num_seqs);
  while (!buckets_.empty() && buckets_.back() > max_tokens_) buckets_.pop_back();

  upload_weights(weights);
  fold_layernorms();
  allocate_activations();
  warm_up_gemms();
  allocate_kv_pool(num_blocks_arg, gpu_memory_fraction);
  capture_decode_graphs();
}

template <typename T>
Engine<T>::~Engine() {
  for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
  if (stream_) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  for (cudaEvent_t e : run_done_) {
    if (e) cudaEventDestroy(e);
  }
  if (uploads_read_) cudaEventDestroy(uploads_read_);
}

template <typename T>
void Engine<T>::upload_weights(const HostWeights& weights) {
  struct Spec {
    std::string name;
    std::vector<int64_t> shape;
    bool fp32;  // kept in float32 (LayerNorm parameters)
    const void** dst;
    size_t zero_tail = 0;  // zeroed elements allocated after the tensor
  };
  std::vector<Spec> specs;
  const int64_t C = C_, I = I_;
  // wte gets padded_vocab() rows, the extra ones zero: the LM head GEMM's N (see enqueue_logits).
  specs.push_back({"wte", {V_, C}, false, reinterpret_cast<const void**>(&wte_),
                   size_t(padded_vocab() - V_) * C});
  specs.push_back({"wpe", {P_, C}, false, reinterpret_cast<const void**>(&wpe_)});
  specs.push_back({"ln_f.weight", {C}, true, reinterpret_cast<const void**>(&ln_f_w_)});
  specs.push_back({"ln_f.bias", {C}, true, reinterpret_cast<const void**>(&ln_f_b_)});
  layers_.resize(L_);
  for (int l = 0; l < L_; ++l) {
    for_each_layer_tensor(layers_[l], l, C, I, [&](const std::string& name,
                                                   std::vector<int64_t> shape, auto** dst) {
      // The LayerNorm parameters (const float**) stay float32.
      constexpr bool fp32 = std::is_same_v<decltype(dst), const float**>;
      specs.push_back({name, std::move(shape), fp32, reinterpret_cast<const void**>(dst)});
    });
  }

  size_t total = 0, largest = 0;
  for (const Spec& s : specs) {
    auto it = weights.find(s.name);
    if (it == weights.end()) throw std::invalid_argument("missing weight tensor '" + s.name + "'");
    if (it->second.shape != s.shape) {
      throw std::invalid_argument("weight tensor '" + s.name + "' has shape " +
                                  shape_str(it->second.shape) + ", the config needs " +
                                  shape_str(s.shape));
    }
    size_t n = 1;
    for (int64_t d : s.shape) n *= size_t(d);
    total += align_up((n + s.zero_tail) * (s.fp32 ? sizeof(float) : sizeof(T)));
    largest = std::max(largest, n);
  }
  weights_.reset(total, "the weights");
  DeviceBuffer staging(largest * sizeof(float), "weight staging");
  size_t offset = 0;
  for (const Spec& s : specs) {
    const HostTensor& h = weights.at(s.name);
    size_t n = 1;
    for (int64_t d : s.shape) n *= size_t(d);
    char* dst = weights_.get() + offset;
    const size_t elem = s.fp32 || std::is_same_v<T, float> ? sizeof(float) : sizeof(T);
    CUDA_CHECK(cudaMemsetAsync(dst + n * elem, 0, s.zero_tail * elem, stream_));
    // NOTE: every copy and conversion is ordered on stream_, so reusing `staging` is safe.
    if (s.fp32 || std::is_same_v<T, float>) {
      CUDA_CHECK(cudaMemcpyAsync(dst, h.data, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
      offset += align_up((n + s.zero_tail) * sizeof(float));
    } else {
      CUDA_CHECK(cudaMemcpyAsync(staging.get(), h.data, n * sizeof(float), cudaMemcpyHostToDevice,
                                 stream_));
      const int blocks = int(std::min<size_t>((n + 255) / 256, 4096));
      convert_kernel<T><<<blocks, 256, 0, stream_>>>(reinterpret_cast<T*>(dst),
                                                     reinterpret_cast<const float*>(staging.get()),
                                                     int64_t(n));
      CUDA_CHECK_LAUNCH();
      offset += align_up((n + s.zero_tail) * sizeof(T));
    }
    *s.dst = dst;
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // staging is freed on return
}

template <typename T>
void Engine<T>::fold_layernorms() {
  const size_t per_layer = 2 * size_t(3 * C_ + I_);
  ln_folds_.reset((per_layer * L_ + 2 * size_t(V_)) * sizeof(float), "the folded LayerNorms");
  float* f = reinterpret_cast<float*>(ln_folds_.get());
  for (const Layer& w : layers_) {
    launch_fold_layernorm<T>(f, w.qkv_w, w.ln_1_w, w.ln_1_b, w.qkv_b, 3 * C_, C_, stream_);
    qkv_folds_.push_back(f);
    f += 2 * size_t(3 * C_);
    launch_fold_layernorm<T>(f, w.fc_w, w.ln_2_w, w.ln_2_b, w.fc_b, I_, C_, stream_);
    fc_folds_.push_back(f);
    f += 2 * size_t(I_);
  }
  launch_fold_layernorm<T>(f, wte_, ln_f_w_, ln_f_b_, nullptr, V_, C_, stream_);
  lm_head_fold_ = f;
}

template <typename T>
void Engine<T>::allocate_activations() {
  // Decode split workspace: the most partial rows any decode batch of up to max_seqs_ needs.
  int64_t partial_rows = 0;
  for (int s = 1; s <= std::max(max_seqs_, max_tokens_); ++s) {
    // Launches use ceil(context / size) <= this count partitions, for any context <= P_.
    const int parts =
        decode_partition_count(s, H_, P_, num_sms_, decode_heads_per_block(s, H_, num_sms_));
    // Skinny steps (Step::merge_in_proj) keep a partial row even when there is one partition.
    if (parts > 1 || s <= kSkinnyMaxRows) {
      partial_rows = std::max<int64_t>(partial_rows, int64_t(s) * H_ * parts);
    }
  }
  const int64_t counter_rows = int64_t(std::max(max_seqs_, max_tokens_)) * H_;
  const StepLayout cap = make_layout(max_tokens_, max_seqs_, max_tokens_, max_blocks_, true);
  step_bytes_ = std::max(cap.bytes, align_up(size_t(2) * 4 * 65536, 16));

  const size_t Tn = size_t(max_tokens_), C = size_t(C_);
  auto carve = [&](Carver& cv) {
    residual_ = cv.take<float>(Tn * C * sizeof(float));
    ln_out_ = cv.take<T>(Tn * C * sizeof(T));
    qkv_ = cv.take<T>(Tn * 3 * C * sizeof(T));
    attn_ = cv.take<T>(Tn * C * sizeof(T));
    tmp_ = cv.take<T>(Tn * C * sizeof(T));
    mlp_ = cv.take<T>(Tn * size_t(I_) * sizeof(T));
    final_x_ = cv.take<T>(size_t(logits_rows_) * C * sizeof(T));
    logits_ = cv.take<float>(size_t(logits_rows_) * V_ * sizeof(float));
    if (!std::is_same_v<T, float>) {
      logits_t_ = cv.take<T>(size_t(logits_rows_) * padded_vocab() * sizeof(T));
    }
    next_tokens_ = cv.take<int32_t>(Tn * sizeof(int32_t));
    greedy_keys_ = cv.take<unsigned long long>(size_t(max_seqs_) * sizeof(unsigned long long));
    step_slots_ = cv.take<int32_t>(size_t(kMaxDecodeSteps) * max_seqs_ * sizeof(int32_t));
    token_history_ = cv.take<int32_t>(size_t(kMaxDecodeSteps) * max_seqs_ * sizeof(int32_t));
    run_step_ = cv.take<int32_t>(sizeof(int32_t));
    step_dev_ = cv.take<char>(step_bytes_);
    decode_ws_.partial_out = cv.take<float>(size_t(partial_rows) * D_ * sizeof(float));
    decode_ws_.partial_max = cv.take<float>(size_t(partial_rows) * sizeof(float));
    decode_ws_.partial_sum = cv.take<float>(size_t(partial_rows) * sizeof(float));
    decode_ws_.counters = cv.take<unsigned>(size_t(counter_rows) * sizeof(unsigned));
  };
  Carver plan(nullptr);
  carve(plan);
  activations_.reset(plan.size(), "the activations");
  Carver real(activations_.get());
  carve(real);
  decode_ws_.capacity_rows = partial_rows;
  decode_ws_.capacity_counters = counter_rows;
  CUDA_CHECK(cudaMemset(decode_ws_.counters, 0, size_t(counter_rows) * sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(greedy_keys_, 0, size_t(max_seqs_) * sizeof(unsigned long long)));
  step_host_.reset(step_bytes_);
  tokens_host_.reset(Tn * sizeof(int32_t));
  step_slots_host_.reset(size_t(kMaxDecodeSteps) * max_seqs_ * sizeof(int32_t));
  for (PinnedBuffer& b : token_history_host_) {
    b.reset(size_t(kMaxDecodeSteps) * max_seqs_ * sizeof(int32_t));
  }
}

// Makes (and, for decode-sized buckets, times) the cuBLASLt plans of every row bucket a step
// can use, before the KV pool takes the free memory: no step pays for them or allocates.
template <typename T>
void Engine<T>::warm_up_gemms() {
  const size_t Tn = size_t(max_tokens_);
  CUDA_CHECK(cudaMemsetAsync(ln_out_, 0, Tn * C_ * sizeof(T), stream_));  // the GEMM inputs
  CUDA_CHECK(cudaMemsetAsync(attn_, 0, Tn * C_ * sizeof(T), stream_));
  CUDA_CHECK(cudaMemsetAsync(mlp_, 0, Tn * I_ * sizeof(T), stream_));
  CUDA_CHECK(cudaMemsetAsync(final_x_, 0, size_t(logits_rows_) * C_ * sizeof(T), stream_));
  const Layer& w = layers_[0];
  for (int bucket = 1;; bucket *= 2) {
    const int n = std::min(bucket, max_tokens_);
    if (n > skinny_max_rows_) {
      gemm_qkv(w, n);
      gemm_proj(w, n);
      gemm_fc(w, n);
      gemm_fc_proj(w, n);
    }
    const int rows = std::min(n, logits_rows_);
    if (rows > skinny_max_rows_) {
      gemm_lm_head(rows, false);  // sampling
      gemm_lm_head(rows, true);   // logits returned to the user
    }
    if (n == max_tokens_) break;
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <typename T>
void Engine<T>::allocate_kv_pool(int num_blocks_arg, double gpu_memory_fraction) {
  const size_t block_bytes = size_t(block_size) * C_ * sizeof(T);  // one block of one cache
  kv_bytes_per_block = int64_t(block_bytes) * 2 * L_;
  if (num_blocks_arg < 0) {
    CUDA_CHECK(cudaDeviceSynchronize());
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    const double budget = double(free_bytes) * gpu_memory_fraction;
    num_blocks_arg = int(std::min<double>(budget / double(kv_bytes_per_block), 2e9));
    if (num_blocks_arg < max_blocks_) {
      throw std::runtime_error(
          "out of GPU memory: " + std::to_string(free_bytes >> 20) + " MiB free after the weights "
          "hold " + std::to_string(num_blocks_arg) + " KV blocks, fewer than the " +
          std::to_string(max_blocks_) + " one full-length sequence needs");
    }
  }
  num_blocks = num_blocks_arg;
  cache_bytes_ = size_t(num_blocks) * block_bytes;
  kv_pool_.reset(cache_bytes_ * 2 * L_, "the KV cache");
}

template <typename T>
void Engine<T>::capture_decode_graphs() {
  const std::vector<int32_t> none(1, 0);
  const float one = 1.f;
  const uint64_t seed = 0;
  const int64_t counter = 0;
  StepInputs in;
  in.token_ids = in.positions = in.slot_mapping = in.query_start_loc = none.data();
  in.context_lens = in.block_tables = in.logits_indices = none.data();
  SamplingInputs s;
  s.temperature = s.top_p = &one;
  s.top_k = none.data();
  s.seeds = &seed;
  s.counters = &counter;
  for (int bucket : buckets_) {
    if (bucket > logits_rows_) break;
    const Step st = pack_graph(in, &s, bucket);
    enqueue_upload(st);
    Step sampled = st;
    sampled.all_greedy = false;
    // Padding rows only: these change nothing. Both kinds of advancing step (greedy_in_lm_head).
    for (auto [step, advance] : {std::pair{st, false}, {st, true}, {sampled, true}}) {
      launch_decode_graph(step, true, advance);
    }
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---- step preparation -----------------------------------------------------------------------

template <typename T>
void Engine<T>::check_inputs(const StepInputs& in) const {
  if (in.num_tokens > max_tokens_) {
    throw std::invalid_argument("step has " + std::to_string(in.num_tokens) +
                                " tokens, more than max_num_batched_tokens=" +
                                std::to_string(max_tokens_));
  }
  if (in.num_seqs > max_seqs_) {
    throw std::invalid_argument("step has " + std::to_string(in.num_seqs) +
                                " sequences, more than the backend's " +
                                std::to_string(max_seqs_) + " (raise max_num_seqs)");
  }
  if (in.num_logits > max_tokens_) {
    throw std::invalid_argument("step asks for " + std::to_string(in.num_logits) +
                                " logits rows, more than max_num_batched_tokens=" +
                                std::to_string(max_tokens_));
  }
}

template <typename T>
bool Engine<T>::is_decode(const StepInputs& in) const {
  if (in.num_tokens != in.num_seqs) return false;
  for (int s = 0; s < in.num_seqs; ++s) {
    if (in.query_start_loc[s + 1] - in.query_start_loc[s] != 1) return false;
  }
  return true;
}

template <typename T>
int Engine<T>::bucket_for(int num_seqs) const {
  for (int b : buckets_) {
    if (b >= num_seqs) return b;
  }
  return -1;
}

template <typename T>
Step Engine<T>::make_step(const StepLayout& layout, int num_decode_seqs, int max_context_len,
                          int max_query_len) {
  Step st;
  st.layout = layout;
  st.num_decode_seqs = decode_attention_supported(D_, sizeof(T)) ? num_decode_seqs : 0;
  st.max_context_len = max_context_len;
  st.max_query_len = max_query_len;
  st.skinny = layout.T <= skinny_max_rows_ && skinny_gemm_supported(layout.T, C_) &&
              skinny_gemm_supported(layout.T, I_);
  st.merge_in_proj = merge_in_proj_ && st.skinny && st.num_decode_seqs == layout.S &&
                     layout.T == layout.S && skinny_merges_attention(layout.T, C_);
  const int nd = std::max(st.num_decode_seqs, 1);
  st.heads_per_block = decode_heads_per_block(nd, H_, num_sms_);
  st.partition_size = decode_partition_size(nd, H_, std::max(max_context_len, 1), num_sms_,
                                            st.heads_per_block);
  auto ptr = [&](size_t offset) { return reinterpret_cast<const int32_t*>(step_dev_ + offset); };
  st.token_ids = ptr(layout.token_ids);
  st.positions = ptr(layout.positions);
  st.slot_mapping = ptr(layout.slot_mapping);
  st.query_start_loc = ptr(layout.query_start_loc);
  st.context_lens = ptr(layout.context_lens);
  st.block_tables = ptr(layout.block_tables);
  st.logits_indices = ptr(layout.logits_indices);
  st.sampling.temperature = reinterpret_cast<const float*>(step_dev_ + layout.temperature);
  st.sampling.top_k = ptr(layout.top_k);
  st.sampling.top_p = reinterpret_cast<const float*>(step_dev_ + layout.top_p);
  st.sampling.seeds = reinterpret_cast<const uint64_t*>(step_dev_ + layout.seeds);
  st.sampling.counters = reinterpret_cast<const int64_t*>(step_dev_ + layout.counters);
  return st;
}

template <typename T>
Step Engine<T>::pack_eager(const StepInputs& in, const SamplingInputs* s) {
  const int width = std::min(in.max_blocks_per_seq, max_blocks_);
  const StepLayout l = make_layout(in.num_tokens, in.num_seqs, in.num_logits, width, s != nullptr);
  char* h = step_host_.get();
  auto put = [&](size_t offset, const void* src, size_t bytes) {
    if (bytes) std::memcpy(h + offset, src, bytes);
  };
  put(l.token_ids, in.token_ids, 4 * size_t(l.T));
  put(l.positions, in.positions, 4 * size_t(l.T));
  put(l.slot_mapping, in.slot_mapping, 4 * size_t(l.T));
  put(l.query_start_loc, in.query_start_loc, 4 * size_t(l.S + 1));
  put(l.context_lens, in.context_lens, 4 * size_t(l.S));
  for (int q = 0; q < l.S; ++q) {
    put(l.block_tables + 4 * size_t(q) * width,
        in.block_tables + size_t(q) * in.max_blocks_per_seq, 4 * size_t(width));
  }
  put(l.logits_indices, in.logits_indices, 4 * size_t(l.R));
  if (s) {
    put(l.temperature, s->temperature, 4 * size_t(l.R));
    put(l.top_k, s->top_k, 4 * size_t(l.R));
    put(l.top_p, s->top_p, 4 * size_t(l.R));
    put(l.seeds, s->seeds, 8 * size_t(l.R));
    put(l.counters, s->counters, 8 * size_t(l.R));
  }
  // The leading one-token sequences (the scheduler puts decodes first) take the decode kernel.
  int num_decode = 0;
  while (num_decode < l.S && in.query_start_loc[num_decode + 1] - in.query_start_loc[num_decode] == 1) {
    ++num_decode;
  }
  int max_context = 0, max_query = 0;
  for (int q = 0; q < num_decode; ++q) max_context = std::max(max_context, in.context_lens[q]);
  for (int q = num_decode; q < l.S; ++q) {
    max_query = std::max(max_query, in.query_start_loc[q + 1] - in.query_start_loc[q]);
  }
  return make_step(l, num_decode, max_context, max_query);
}

template <typename T>
Step Engine<T>::pack_graph(const StepInputs& in, const SamplingInputs* s, int bucket) {
  const int B = bucket, W = max_blocks_;
  const StepLayout l = make_layout(B, B, B, W, s != nullptr);
  char* h = step_host_.get();
  auto ints = [&](size_t offset) { return reinterpret_cast<int32_t*>(h + offset); };
  const int S = in.num_seqs, R = in.num_logits;
  int32_t* tok = ints(l.token_ids);
  int32_t* pos = ints(l.positions);
  int32_t* slot = ints(l.slot_mapping);
  int32_t* qsl = ints(l.query_start_loc);
  int32_t* ctx = ints(l.context_lens);
  int32_t* tables = ints(l.block_tables);
  int32_t* rows = ints(l.logits_indices);
  std::memcpy(tok, in.token_ids, 4 * size_t(S));
  std::memcpy(pos, in.positions, 4 * size_t(S));
  std::memcpy(slot, in.slot_mapping, 4 * size_t(S));
  std::memcpy(ctx, in.context_lens, 4 * size_t(S));
  for (int i = S; i < B; ++i) tok[i] = 0, pos[i] = 0, slot[i] = -1, ctx[i] = 0;
  for (int i = 0; i <= B; ++i) qsl[i] = i;
  const int w = std::min(in.max_blocks_per_seq, W);
  std::memset(tables, 0, 4 * size_t(B) * W);
  for (int q = 0; q < S; ++q) {
    std::memcpy(tables + size_t(q) * W, in.block_tables + size_t(q) * in.max_blocks_per_seq,
                4 * size_t(w));
  }
  std::memcpy(rows, in.logits_indices, 4 * size_t(R));
  for (int i = R; i < B; ++i) rows[i] = 0;
  bool all_greedy = false;
  if (s) {
    auto* temp = reinterpret_cast<float*>(h + l.temperature);
    auto* top_k = ints(l.top_k);
    auto* top_p = reinterpret_cast<float*>(h + l.top_p);
    auto* seeds = reinterpret_cast<uint64_t*>(h + l.seeds);
    auto* counters = reinterpret_cast<int64_t*>(h + l.counters);
    std::memcpy(temp, s->temperature, 4 * size_t(R));
    std::memcpy(top_k, s->top_k, 4 * size_t(R));
    std::memcpy(top_p, s->top_p, 4 * size_t(R));
    std::memcpy(seeds, s->seeds, 8 * size_t(R));
    std::memcpy(counters, s->counters, 8 * size_t(R));
    for (int i = R; i < B; ++i) {
      temp[i] = 0.f, top_k[i] = 0, top_p[i] = 1.f, seeds[i] = 0, counters[i] = 0;  // greedy
    }
    all_greedy = std::all_of(temp, temp + B, [](float t) { return t == 0.f; });
  }
  // NOTE: the grid of a graph is fixed, so decode attention is sized for the longest possible
  // context (n_positions); blocks past a sequence's real context exit at once.
  Step st = make_step(l, B, P_, 1);
  st.all_greedy = all_greedy;
  return st;
}

// ---- enqueue --------------------------------------------------------------------------------

template <typename T>
void Engine<T>::enqueue_upload(const Step& st) {
  CUDA_CHECK(cudaMemcpyAsync(step_dev_, step_host_.get(), st.layout.bytes,
                             cudaMemcpyHostToDevice, stream_));
}

template <typename T>
void Engine<T>::enqueue_attention(const Step& st, T* k, T* v, L2Range prefetch,
                                  bool merge_later) {
  const int S = st.layout.S, W = st.layout.width, nd = st.num_decode_seqs;
  if (nd > 0) {
    // In wide steps the decode rows' K/V are written here (the skinny QKV GEMV writes its own).
    // NOTE: programmatic launch after the skinny GEMV or a cuBLASLt GEMM (kernels both): the
    // kernel waits for it before reading q, the cache or out.
    // The newest token's K/V are in qkv_ either way: the kernel reads them there, so it can copy
    // every older row before it waits.
    const int32_t* write_slots = !st.skinny && attention_writes_kv_ ? st.slot_mapping : nullptr;
    launch_decode_attention<T>(attn_, qkv_, k, v, st.context_lens, st.block_tables, write_slots,
                               nd, W, H_, D_, block_size, st.max_context_len, st.partition_size,
                               st.heads_per_block, decode_ws_, stream_, pdl_, prefetch,
                               merge_later);
  }
  if (nd < S) {  // the prompt chunks, after the decode rows
    launch_prefill_attention<T>(attn_, qkv_, k, v, st.positions, st.query_start_loc + nd,
                                st.block_tables + size_t(nd) * W, S - nd, W, H_, D_, block_size,
                                st.max_query_len, stream_);
  }
}

template <typename T>
void Engine<T>::enqueue_embedding(const Step& st) {
  launch_embedding<T>(residual_, st.skinny ? nullptr : ln_out_, st.token_ids, st.positions, wte_,
                      wpe_, layers_[0].ln_1_w, layers_[0].ln_1_b, st.layout.T, C_, eps_, stream_);
}

// embed false: residual_ already holds the step's x (graph_embeds).
template <typename T>
void Engine<T>::enqueue_layers(const Step& st, bool embed) {
  if (embed) enqueue_embedding(st);
  for (int l = 0; l < L_; ++l) {
    if (st.skinny) {
      enqueue_skinny_layer(st, l);
    } else {
      enqueue_wide_layer(st, l);
    }
  }
}

// A layer as 5 launches: ln_1 + QKV GEMV (+ write_kv), attention, proj GEMV (+ residual),
// ln_2 + fc GEMV (+ GELU), fc_proj GEMV (+ residual). Each GEMV asks L2 for the weights after
// its own (l2_ahead), so the next one's first loads hit L2.
template <typename T>
void Engine<T>::enqueue_skinny_layer(const Step& st, int l) {
  const int n = st.layout.T;
  const Layer& w = layers_[l];
  SkinnyParams<T> q;
  q.x = residual_, q.ln_weight = w.ln_1_w, q.ln_fold = qkv_folds_[l], q.eps = eps_;
  q.weight = w.qkv_w, q.bias = w.qkv_b, q.out = qkv_;
  q.k_cache = k_cache(l), q.v_cache = v_cache(l), q.slot_mapping = st.slot_mapping;
  q.rows = n, q.N = 3 * C_, q.K = C_, q.resident = resident_gemv_;
  q.prefetch = l2_ahead(w.qkv_w + size_t(3) * C_ * C_);
  launch_skinny_gemm<T>(q, SkinnyInput::kLayerNorm, SkinnyOutput::kBiasQkv, num_sms_, stream_,
                        pdl_);
  const bool merge = st.merge_in_proj;
  // The QKV GEMV asked for the proj weights.
  enqueue_attention(st, k_cache(l), v_cache(l), {}, merge);
  SkinnyParams<T> p;
  p.x = attn_, p.weight = w.proj_w, p.bias = w.proj_b, p.out = residual_;
  if (merge) {
    p.partials = decode_ws_, p.context_lens = st.context_lens, p.head_size = D_;
    p.partition_size = st.partition_size;
    p.max_partitions = decode_num_partitions(st.max_context_len, st.partition_size);
  }
  p.rows = n, p.N = C_, p.K = C_, p.resident = resident_gemv_;
  p.prefetch = l2_ahead(w.proj_w + size_t(C_) * C_);
  launch_skinny_gemm<T>(p, merge ? SkinnyInput::kAttentionPartials : SkinnyInput::kActivation,
                        SkinnyOutput::kBiasResidual, num_sms_, stream_, pdl_);
  SkinnyParams<T> f;
  f.x = residual_, f.ln_weight = w.ln_2_w, f.ln_fold = fc_folds_[l], f.eps = eps_;
  f.weight = w.fc_w, f.bias = w.fc_b, f.out = mlp_;
  f.rows = n, f.N = I_, f.K = C_, f.resident = resident_gemv_;
  f.prefetch = l2_ahead(w.fc_w + size_t(I_) * C_);
  launch_skinny_gemm<T>(f, SkinnyInput::kLayerNorm, SkinnyOutput::kBiasGelu, num_sms_, stream_,
                        pdl_);
  SkinnyParams<T> g;
  g.x = mlp_, g.weight = w.fc_proj_w, g.bias = w.fc_proj_b, g.out = residual_;
  g.rows = n, g.N = C_, g.K = I_, g.resident = resident_gemv_;
  g.prefetch = l2_ahead(l + 1 < L_ ? w.fc_proj_w + size_t(C_) * I_ : nullptr);
  launch_skinny_gemm<T>(g, SkinnyInput::kActivation, SkinnyOutput::kBiasResidual, num_sms_,
                        stream_, pdl_);
}

// A layer as cuBLASLt GEMMs with our kernels between: QKV, write_kv (prompt rows), attention,
// proj, residual add + ln_2, fc (+ GELU), fc_proj, residual add + the next layer's ln_1.
template <typename T>
void Engine<T>::enqueue_wide_layer(const Step& st, int l) {
  const int n = st.layout.T;
  const Layer& w = layers_[l];
  T* k = k_cache(l);
  T* v = v_cache(l);
  gemm_qkv(w, n);
  // The prompt rows' K/V; decode attention writes those of the decode rows before them.
  const int nd = attention_writes_kv_ ? st.num_decode_seqs : 0;
  launch_write_kv<T>(k, v, qkv_ + size_t(nd) * 3 * C_, st.slot_mapping + nd, n - nd, C_,
                     stream_);
  // NOTE: cuBLASLt's GEMMs ask L2 for nothing; in small wide steps the kernels of ours before
  // them ask for the first bytes of the weights after (l2_ahead); fc_proj has no kernel of ours
  // before it.
  const bool ahead = n <= kWidePrefetchMaxRows;
  auto after = [&](const void* weight_end) { return ahead ? l2_ahead(weight_end) : L2Range{}; };
  enqueue_attention(st, k, v, after(w.qkv_w + size_t(3) * C_ * C_));
  gemm_proj(w, n);
  launch_add_layernorm<T>(residual_, tmp_, ln_out_, w.ln_2_w, w.ln_2_b, nullptr, n, C_, eps_,
                          stream_, after(w.proj_w + size_t(C_) * C_));
  gemm_fc(w, n);
  gemm_fc_proj(w, n);
  const bool last = l + 1 == L_;
  // Residual add, fused with the next layer's ln_1 (the final LayerNorm runs on the logits rows
  // only, in enqueue_logits).
  launch_add_layernorm<T>(residual_, tmp_, last ? nullptr : ln_out_,
                          last ? nullptr : layers_[l + 1].ln_1_w,
                          last ? nullptr : layers_[l + 1].ln_1_b, nullptr, n, C_, eps_, stream_,
                          after(last ? nullptr : w.fc_proj_w + size_t(C_) * I_));
}

template <typename T>
bool Engine<T>::enqueue_logits(const Step& st, int r0, int rows, bool exact,
                               unsigned long long* argmax) {
  const int32_t* idx = st.logits_indices + r0;
  if (skinny_lm_head(rows)) {
    SkinnyParams<T> p;
    p.x = residual_, p.x_rows = idx, p.ln_weight = ln_f_w_, p.ln_fold = lm_head_fold_;
    p.eps = eps_;
    p.weight = wte_, p.out = logits_, p.argmax = argmax;
    p.rows = rows, p.N = V_, p.K = C_;
    launch_skinny_gemm<T>(p, SkinnyInput::kLayerNorm, SkinnyOutput::kLogits, num_sms_, stream_,
                          pdl_);
    return false;
  }
  if (argmax) throw std::logic_error("enqueue_logits: greedy keys from the skinny LM head only");
  launch_add_layernorm<T>(residual_, nullptr, final_x_, ln_f_w_, ln_f_b_, idx, rows, C_, eps_,
                          stream_);
  return gemm_lm_head(rows, exact);
}

// The weights are stored in the order a decode step reads them (each layer's qkv, proj, fc,
// fc_proj with their biases and LayerNorm parameters between), except the LM head's wte, which
// comes first. So the l2_lookahead_ bytes after the end of a layer GEMV's W are the next GEMVs'
// weights; after the last layer (weight_end nullptr) they are the start of wte.
template <typename T>
L2Range Engine<T>::l2_ahead(const void* weight_end) const {
  const char* from = weight_end ? static_cast<const char*>(weight_end)
                                : reinterpret_cast<const char*>(wte_);
  from = weights_.get() + align_up(size_t(from - weights_.get()), 16);
  const size_t left = size_t(weights_.get() + weights_.size() - from);
  return {from, std::min(l2_lookahead_, left)};
}

template <typename T>
void Engine<T>::gemm_qkv(const Layer& w, int n) {
  gemm_.matmul(qkv_, ln_out_, w.qkv_w, w.qkv_b, n, 3 * C_, C_, dtype, false, Epilogue::kBias,
               stream_);
}

template <typename T>
void Engine<T>::gemm_proj(const Layer& w, int n) {
  gemm_.matmul(tmp_, attn_, w.proj_w, w.proj_b, n, C_, C_, dtype, false, Epilogue::kBias,
               stream_);
}

template <typename T>
void Engine<T>::gemm_fc(const Layer& w, int n) {
  gemm_.matmul(mlp_, ln_out_, w.fc_w, w.fc_b, n, I_, C_, dtype, false, Epilogue::kBiasGelu,
               stream_);
}

template <typename T>
void Engine<T>::gemm_fc_proj(const Layer& w, int n) {
  gemm_.matmul(tmp_, mlp_, w.fc_proj_w, w.fc_proj_b, n, C_, I_, dtype, false, Epilogue::kBias,
               stream_);
}

template <typename T>
bool Engine<T>::gemm_lm_head(int rows, bool exact) {
  if (std::is_same_v<T, float> || exact) {
    gemm_.matmul(logits_, final_x_, wte_, nullptr, rows, V_, C_, dtype, true, Epilogue::kNone,
                 stream_);
    return false;
  }
  // NOTE: with N = V = 50,257 (odd) cuBLASLt offers only an sm_75 kernel (~200 us at 256 rows on
  // an H200). For sampling, the GEMM runs over wte's zero-padded rows, N a multiple of 8, in half
  // precision, and the sampler reads those rows as they are (a widening pass cost 35 us at 256
  // rows). Those logits carry the dtype's rounding (bf16: 2^-8 relative), as a half-precision
  // model's logits do; logits returned to the user (exact) take the float32-output GEMM.
  gemm_.matmul(logits_t_, final_x_, wte_, nullptr, rows, padded_vocab(), C_, dtype, false,
               Epilogue::kNone, stream_);
  return true;
}

template <typename T>
void Engine<T>::enqueue_sample(const Step& st, int r0, int rows, bool half_logits) {
  DeviceSampling p = st.sampling;
  p.temperature += r0, p.top_k += r0, p.top_p += r0, p.seeds += r0, p.counters += r0;
  // NOTE: launched programmatically (as the advance after it), the sampler's launch overlaps the
  // LM head. H200, gpt2 batch 1, with the merge of attention_decode.cu: 0.323 -> 0.313 ms a step
  // (notes.md, fifteenth session).
  if (half_logits) {  // logits_ is the scratch of temperature-scaled rows
    launch_sample<T>(next_tokens_ + r0, logits_t_, padded_vocab(), logits_, p, rows, V_, stream_,
                     pdl_);
  } else {
    launch_sample<float>(next_tokens_ + r0, logits_, V_, logits_, p, rows, V_, stream_, pdl_);
  }
}

template <typename T>
bool Engine<T>::greedy_in_lm_head(const Step& st, bool sample, bool advance) const {
  const int R = st.layout.R;
  return greedy_in_lm_head_ && sample && advance && st.all_greedy && R <= logits_rows_ &&
         skinny_lm_head(R);
}

template <typename T>
void Engine<T>::enqueue_forward(const Step& st, bool sample, float* logits_host, bool advance,
                                bool embed) {
  const int R = st.layout.R;
  const bool greedy = greedy_in_lm_head(st, sample, advance);  // one chunk of rows then
  enqueue_layers(st, embed);
  for (int r0 = 0; r0 < R; r0 += logits_rows_) {
    const int rows = std::min(logits_rows_, R - r0);
    const bool half_logits =
        enqueue_logits(st, r0, rows, !sample, greedy ? greedy_keys_ : nullptr);
    if (sample && !greedy) {
      enqueue_sample(st, r0, rows, half_logits);
    } else if (logits_host) {
      CUDA_CHECK(cudaMemcpyAsync(logits_host + size_t(r0) * V_, logits_, 4 * size_t(rows) * V_,
                                 cudaMemcpyDeviceToHost, stream_));
    }
  }
  if (sample && advance) {
    // NOTE: H200, gpt2 batch 1: the token download and the advance launched between graphs cost
    // ~17 us a step; see notes.md (thirteenth session).
    auto ints = [](const int32_t* p) { return const_cast<int32_t*>(p); };
    NextEmbedding<T> next;  // the next step's graph does not embed: do it here
    if (!graph_embeds(st)) next = {residual_, wte_, wpe_, C_};
    launch_advance_decode_step<T>(ints(st.token_ids), ints(st.positions), ints(st.slot_mapping),
                                  ints(st.context_lens),
                                  const_cast<int64_t*>(st.sampling.counters), token_history_,
                                  next_tokens_, greedy ? greedy_keys_ : nullptr, step_slots_,
                                  run_step_, st.layout.S, next, stream_, pdl_);
  } else if (sample) {
    CUDA_CHECK(cudaMemcpyAsync(tokens_host_.get(), next_tokens_, 4 * size_t(R),
                               cudaMemcpyDeviceToHost, stream_));
  }
}

// Replays the graph of st's bucket over the inputs already in step_dev_ (the upload is not part
// of the graph, so that a decode run can advance them on the GPU), without waiting for it. The
// first step of a bucket runs eagerly (warming plans and attributes) and is then captured.
template <typename T>
void Engine<T>::launch_decode_graph(const Step& st, bool sample, bool advance,
                                    bool after_advance) {
  const bool embed = graph_embeds(st);
  if (!embed && !after_advance) enqueue_embedding(st);  // inputs from the host
  const auto key =
      std::make_tuple(st.layout.T, sample, advance, greedy_in_lm_head(st, sample, advance));
  auto it = graphs_.find(key);
  if (it != graphs_.end()) {
    CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
    return;
  }
  enqueue_forward(st, sample, nullptr, advance, embed);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  graphs_.emplace(key, capture_graph(stream_, [&] {
                    enqueue_forward(st, sample, nullptr, advance, embed);
                  }));
  num_graphs = int(graphs_.size());
}

// A run of num_steps graph replays: the inputs of step 0 are uploaded (with continue_run its
// tokens are the last ones the previous run sampled, already on the GPU), each step but the last
// advances the inputs to the next on the GPU at the end of its graph, and the ids of all steps
// are downloaded at the end. Nothing waits.
template <typename T>
bool Engine<T>::enqueue_decode_run(const StepInputs& in, const SamplingInputs& s, int num_steps,
                                   const int32_t* slot_mappings, bool continue_run) {
  CUDA_CHECK(cudaSetDevice(device));
  check_inputs(in);
  const int S = in.num_seqs;
  const int bucket = use_graphs && is_decode(in) ? bucket_for(S) : -1;
  if (bucket <= 0 || bucket > logits_rows_ || num_steps > kMaxDecodeSteps) return false;
  if (continue_run && !next_tokens_from_run_) return false;  // a step ran in between
  if (int(runs_.size()) >= kRunsInFlight) {
    throw std::logic_error("enqueue_decode_run: " + std::to_string(kRunsInFlight) +
                           " runs are in flight");
  }
  wait_uploads_read();
  const Step st = pack_graph(in, &s, bucket);
  // The device rows of a run are the bucket's (the graphs' shape); padding slots are -1.
  const size_t row_bytes = 4 * size_t(bucket);
  if (num_steps > 1) {
    int32_t* slots = reinterpret_cast<int32_t*>(step_slots_host_.get());
    for (int i = 1; i < num_steps; ++i) {
      std::memcpy(slots + size_t(i - 1) * bucket, slot_mappings + size_t(i) * S, 4 * size_t(S));
      std::fill(slots + size_t(i - 1) * bucket + S, slots + size_t(i) * bucket, -1);
    }
    CUDA_CHECK(cudaMemcpyAsync(step_slots_, slots, row_bytes * (num_steps - 1),
                               cudaMemcpyHostToDevice, stream_));
  }
  enqueue_upload(st);
  if (continue_run) {
    CUDA_CHECK(cudaMemcpyAsync(const_cast<int32_t*>(st.token_ids), next_tokens_, 4 * size_t(S),
                               cudaMemcpyDeviceToDevice, stream_));
  }
  CUDA_CHECK(cudaMemsetAsync(run_step_, 0, sizeof(int32_t), stream_));
  CUDA_CHECK(cudaEventRecord(uploads_read_, stream_));
  for (int i = 0; i < num_steps; ++i) launch_decode_graph(st, true, i + 1 < num_steps, i > 0);
  // The buffer the run in flight (if any) does not use.
  const int buffer = runs_.empty() ? 0 : (runs_.back().buffer + 1) % kRunsInFlight;
  CUDA_CHECK(cudaMemcpyAsync(token_history_ + size_t(num_steps - 1) * bucket, next_tokens_,
                             row_bytes, cudaMemcpyDeviceToDevice, stream_));
  CUDA_CHECK(cudaMemcpyAsync(token_history_host_[buffer].get(), token_history_,
                             row_bytes * num_steps, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaEventRecord(run_done_[buffer], stream_));
  runs_.push_back({num_steps, S, buffer});
  next_tokens_from_run_ = true;
  return true;
}

template <typename T>
void Engine<T>::wait_decode_run(int32_t* next_tokens) {
  if (runs_.empty()) throw std::logic_error("wait_decode_run: no run in flight");
  const RunInFlight run = runs_.front();
  CUDA_CHECK(cudaEventSynchronize(run_done_[run.buffer]));
  const int32_t* rows = reinterpret_cast<const int32_t*>(token_history_host_[run.buffer].get());
  const size_t width = size_t(bucket_for(run.num_seqs));
  for (int i = 0; i < run.num_steps; ++i) {
    std::memcpy(next_tokens + size_t(i) * run.num_seqs, rows + i * width,
                4 * size_t(run.num_seqs));
  }
  runs_.pop_front();
}

template <typename T>
void Engine<T>::run(const StepInputs& in, const SamplingInputs* s, float* logits,
                    int32_t* next_tokens) {
  CUDA_CHECK(cudaSetDevice(device));
  check_inputs(in);
  wait_uploads_read();
  next_tokens_from_run_ = false;
  const int R = in.num_logits;
  if (in.num_tokens == 0) return;
  const int bucket = (use_graphs && is_decode(in)) ? bucket_for(in.num_seqs) : -1;
  if (bucket > 0 && R <= bucket && bucket <= logits_rows_) {
    const Step st = pack_graph(in, s, bucket);
    enqueue_upload(st);
    launch_decode_graph(st, s != nullptr);
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (s) {
      std::memcpy(next_tokens, tokens_host_.get(), 4 * size_t(R));
    } else {
      CUDA_CHECK(cudaMemcpyAsync(logits, logits_, 4 * size_t(R) * V_, cudaMemcpyDeviceToHost,
                                 stream_));
      CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
    return;
  }
  const Step st = pack_eager(in, s);
  enqueue_upload(st);
  enqueue_forward(st, s != nullptr, logits);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (s) std::memcpy(next_tokens, tokens_host_.get(), 4 * size_t(R));
}

template <typename T>
void Engine<T>::forward(const StepInputs& in, float* logits) {
  run(in, nullptr, logits, nullptr);
}

template <typename T>
void Engine<T>::forward_and_sample(const StepInputs& in, const SamplingInputs& s,
                                   int32_t* next_tokens) {
  run(in, &s, nullptr, next_tokens);
}

template <typename T>
void Engine<T>::copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) {
  CUDA_CHECK(cudaSetDevice(device));
  for (int i = 0; i < num_copies; ++i) {
    if (src[i] < 0 || src[i] >= num_blocks || dst[i] < 0 || dst[i] >= num_blocks) {
      throw std::invalid_argument("copy_blocks: block id out of range [0, " +
                                  std::to_string(num_blocks) + ")");
    }
  }
  const int chunk = int(step_bytes_ / 8);
  wait_uploads_read();
  for (int i0 = 0; i0 < num_copies; i0 += chunk) {
    const int n = std::min(chunk, num_copies - i0);
    int32_t* h = reinterpret_cast<int32_t*>(step_host_.get());
    std::memcpy(h, src + i0, 4 * size_t(n));
    std::memcpy(h + n, dst + i0, 4 * size_t(n));
    CUDA_CHECK(cudaMemcpyAsync(step_dev_, h, 8 * size_t(n), cudaMemcpyHostToDevice, stream_));
    const int32_t* d = reinterpret_cast<const int32_t*>(step_dev_);
    launch_copy_blocks(kv_pool_.get(), int64_t(cache_bytes_),
                       int64_t(block_size) * C_ * int64_t(sizeof(T)), 2 * L_, d, d + n, n,
                       stream_);
    CUDA_CHECK(cudaStreamSynchronize(stream_));  // the pinned buffer is reused
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CudaModel
// ---------------------------------------------------------------------------------------------

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

CudaModel::CudaModel(const ModelConfig& config, const HostWeights& weights,
                     const std::string& dtype_name_arg, int num_blocks_arg, int block_size_arg,
                     double gpu_memory_fraction, int device_index, int max_num_seqs,
                     int max_num_batched_tokens) {
  const DType dt = parse_dtype(dtype_name_arg);
  if (block_size_arg < 1) throw std::invalid_argument("block_size must be >= 1");
  if (num_blocks_arg == 0 || num_blocks_arg < -1) {
    throw std::invalid_argument("num_blocks must be >= 1, or -1 to size the pool from memory");
  }
  if (!(gpu_memory_fraction > 0.0 && gpu_memory_fraction <= 1.0)) {
    throw std::invalid_argument("gpu_memory_fraction must be in (0, 1]");
  }
  if (max_num_seqs < 1) throw std::invalid_argument("max_num_seqs must be >= 1");
  if (max_num_batched_tokens < 1) {
    throw std::invalid_argument("max_num_batched_tokens must be >= 1");
  }
  if (config.n_head < 1 || config.n_embd % config.n_head != 0) {
    throw std::invalid_argument("n_embd must be a multiple of n_head");
  }
  const int count = device_count();
  if (count == 0) throw std::runtime_error("no CUDA GPU is available (no device or no driver)");
  if (device_index < 0 || device_index >= count) {
    throw std::invalid_argument("device_index " + std::to_string(device_index) + " but " +
                                std::to_string(count) + " CUDA device(s) are visible");
  }
  CUDA_CHECK(cudaSetDevice(device_index));
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    impl_ = std::make_unique<Engine<T>>(config, weights, dt, num_blocks_arg, block_size_arg,
                                        gpu_memory_fraction, device_index, max_num_seqs,
                                        max_num_batched_tokens);
  });
}

CudaModel::~CudaModel() = default;

void CudaModel::forward(const StepInputs& in, float* logits) { impl_->forward(in, logits); }
void CudaModel::forward_and_sample(const StepInputs& in, const SamplingInputs& sampling,
                                   int32_t* next_tokens) {
  impl_->forward_and_sample(in, sampling, next_tokens);
}
bool CudaModel::enqueue_decode_run(const StepInputs& in, const SamplingInputs& sampling,
                                   int num_steps, const int32_t* slot_mappings,
                                   bool continue_run) {
  return impl_->enqueue_decode_run(in, sampling, num_steps, slot_mappings, continue_run);
}
void CudaModel::wait_decode_run(int32_t* next_tokens) { impl_->wait_decode_run(next_tokens); }
void CudaModel::copy_blocks(const int32_t* src, const int32_t* dst, int num_copies) {
  impl_->copy_blocks(src, dst, num_copies);
}
const ModelConfig& CudaModel::config() const { return impl_->cfg; }
int CudaModel::num_blocks() const { return impl_->num_blocks; }
int CudaModel::block_size() const { return impl_->block_size; }
int64_t CudaModel::kv_bytes_per_block() const { return impl_->kv_bytes_per_block; }
std::string CudaModel::device_name() const { return impl_->device_name; }
std::string CudaModel::dtype() const { return dtype_name(impl_->dtype); }
bool CudaModel::use_cuda_graphs() const { return impl_->use_graphs; }
void CudaModel::set_use_cuda_graphs(bool on) { impl_->use_graphs = on; }
int CudaModel::num_cuda_graphs() const { return impl_->num_graphs; }

}  // namespace pagedgpt2::cuda

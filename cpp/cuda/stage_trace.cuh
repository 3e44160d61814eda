// Opt-in stage trace of the skinny GEMV (CMake option PAGEDGPT2_TRACE, off by default): thread 0
// of every block writes one record of when the block started, passed pdl_wait, had x staged,
// had its first products and ended, so that tools/trace_gemv.py can say which stage of which
// block sets a batch-1 step's critical path. Built without the option, every call below
// compiles to nothing.
//
// Two clocks: %globaltimer (ns, one clock for the whole GPU: orders blocks of different SMs and
// kernels) and clock64 (cycles of the block's own SM: exact stage lengths within a block).
#pragma once

#include <cstdint>
#include <vector>

namespace pagedgpt2::cuda {

// One block's record. Stages: 0 start, 1 pdl_wait passed, 2 x staged, 3 warp 0's products of
// its first rows in registers (so its weights had arrived), 4 end.
constexpr int kStages = 5;
struct StageRecord {
  uint32_t N, K, rows, block;   // the GEMV's shape and this block
  uint32_t sm;                  // the SM it ran on
  uint32_t pad;
  uint64_t global_ns[kStages];  // %globaltimer at each stage
  uint64_t clocks[kStages];     // clock64 at each stage
};

constexpr int kStageTraceCapacity = 1 << 18;  // records (~20k a gpt2 batch-1 step)

// Whether the build has the trace (PAGEDGPT2_TRACE).
bool stage_trace_built();
// Forgets the records so far.
void stage_trace_reset();
// The records since the last reset (at most kStageTraceCapacity; later ones are dropped).
std::vector<StageRecord> stage_trace_read();

#if defined(__CUDACC__)
#if defined(PAGEDGPT2_TRACE)
// The records, in the one translation unit that traces (skinny_gemm.cu; without relocatable
// device code a __device__ variable lives in the unit that defines it).
static __device__ StageRecord g_stage_records[kStageTraceCapacity];
static __device__ unsigned g_stage_count = 0;

// Stage times of the calling block, kept by thread 0 in shared memory (not in registers: the
// traced kernel should spill no more than the untraced one).
class StageTrace {
 public:
  __device__ __forceinline__ StageTrace() { mark(0); }
  __device__ __forceinline__ void mark(int stage) {
    if (threadIdx.x != 0) return;
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    stamps()[stage] = t;
    stamps()[kStages + stage] = clock64();
  }
  // Marks a stage that is only reached once `value` is computed: it is stored to shared memory
  // first, and the clocks are read after that store.
  __device__ __forceinline__ void mark_after(int stage, float value) {
    if (threadIdx.x != 0) return;
    *reinterpret_cast<volatile float*>(&stamps()[2 * kStages]) = value;
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    stamps()[stage] = t;
    stamps()[kStages + stage] = clock64();
  }
  // Marks the end and writes the record.
  __device__ __forceinline__ void commit(int N, int K, int rows) {
    mark(kStages - 1);
    if (threadIdx.x != 0) return;
    const unsigned i = atomicAdd(&g_stage_count, 1u);
    if (i >= kStageTraceCapacity) return;
    StageRecord& r = g_stage_records[i];
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    r.N = N, r.K = K, r.rows = rows, r.block = blockIdx.x, r.sm = sm, r.pad = 0;
    for (int s = 0; s < kStages; ++s) {
      r.global_ns[s] = stamps()[s], r.clocks[s] = stamps()[kStages + s];
    }
  }

 private:
  __device__ __forceinline__ static uint64_t* stamps() {
    __shared__ uint64_t s[2 * kStages + 1];  // globaltimer, then clock64, at each stage; a sink
    return s;
  }
};
#else
class StageTrace {
 public:
  __device__ __forceinline__ void mark(int) {}
  __device__ __forceinline__ void mark_after(int, float) {}
  __device__ __forceinline__ void commit(int, int, int) {}
};
#endif  // PAGEDGPT2_TRACE
#endif  // __CUDACC__

}  // namespace pagedgpt2::cuda

// GPU sampling: one 1024-thread block per row, no sort of the vocabulary.
//
// Every token gets a key ordering it as the CPU does (make_key in sampling.cuh: descending scaled
// logit, ties by lower id) and a probability mass in fixed point:
// mass = floor(exp(s - max) * 2^shift), with shift chosen so the whole row sums below 2^63.
// NOTE: integer masses make every sum exact and order-independent, so the draw is deterministic
// run to run whatever the atomics' order; they differ from the CPU's double sums by < 2^-shift
// per token (~1e-14 for GPT-2's vocabulary), i.e. only draws landing that close to a boundary
// can differ.
//
// top-k, top-p and the draw are each "find the first kept token, in key order, at which the
// running count (top-k) or mass (top-p, draw) reaches a target". One histogram of the row over
// kBins bins of (max - s), shared by the three searches, finds the bin holding that token; the
// bin's tokens are gathered and sorted in shared memory (bitonic, <= kCap keys), and a scan finds
// the token. A bin holding more than kCap tokens (near-uniform rows, huge temperatures) is
// narrowed first by 8-bit radix rounds on the key.
#include <cmath>

#include "cuda/cuda_common.cuh"
#include "cuda/sampling.cuh"

namespace pagedgpt2::cuda {
namespace {

using u64 = unsigned long long;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2 * kThreads;
constexpr int kCap = 2048;

__device__ __forceinline__ float from_order_bits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

struct Row {
  float max;        // largest scaled logit
  float bin_scale;  // bins per unit of (max - s)
  float range;      // tokens with max - s >= range have zero mass: not binned
  int shift;        // mass = floor(exp(s - max) * 2^shift)

  __device__ __forceinline__ u64 mass(float s) const {
    return u64(__float2ull_rz(ldexpf(expf(s - max), shift)));
  }
  // Bin of a scaled logit, or -1 (zero mass, after every binned token in key order).
  __device__ __forceinline__ int bin(float s) const {
    const float d = max - s;
    if (!(d < range)) return -1;
    return min(kBins - 1, int(d * bin_scale));
  }
};

// The kept set: bins before `bin` entirely, tokens of `bin` with key >= `key`, nothing after.
struct Cut {
  int bin = kBins;  // kBins: no cut
  u64 key = 0;
  unsigned count = 0;  // kept tokens of `bin`
  u64 mass = 0;        // their mass
};

// A found token and the kept tokens up to and including it, in key order.
struct Found {
  u64 key;
  int bin;          // -1: the target lies past every binned token (only for counts)
  unsigned count_in_bin;
  u64 mass_in_bin;  // kept tokens of `bin` up to the token
  u64 mass_total;   // all kept tokens up to the token
};

struct Shared {
  unsigned bin_count[kBins];
  u64 bin_mass[kBins];
  u64 cand[kCap];
  u64 scan_a[kWarps], scan_b[kWarps];
  unsigned radix_count[256];
  u64 radix_mass[256];
  float red[kWarps];
  int red_idx[kWarps];
  unsigned num_cand;
  Found found;
  int sel;             // selected bin / candidate / digit
  int hit;             // a thread found the crossing
  u64 before_count, before_mass;
};

// Exclusive block scan of a pair of u64 (all threads); returns the block totals.
__device__ void block_scan2(u64& a, u64& b, u64& total_a, u64& total_b, Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  u64 ia = a, ib = b;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 ta = __shfl_up_sync(0xffffffffu, ia, o), tb = __shfl_up_sync(0xffffffffu, ib, o);
    if (lane >= o) ia += ta, ib += tb;
  }
  __syncthreads();
  if (lane == 31) sh.scan_a[warp] = ia, sh.scan_b[warp] = ib;
  __syncthreads();
  if (warp == 0) {
    u64 wa = sh.scan_a[lane], wb = sh.scan_b[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 ta = __shfl_up_sync(0xffffffffu, wa, o), tb = __shfl_up_sync(0xffffffffu, wb, o);
      if (lane >= o) wa += ta, wb += tb;
    }
    sh.scan_a[lane] = wa, sh.scan_b[lane] = wb;  // inclusive over warps
  }
  __syncthreads();
  const u64 wa = warp ? sh.scan_a[warp - 1] : 0, wb = warp ? sh.scan_b[warp - 1] : 0;
  total_a = sh.scan_a[kWarps - 1];
  total_b = sh.scan_b[kWarps - 1];
  a = wa + ia - a;
  b = wb + ib - b;
  __syncthreads();
}

// Sorts sh.cand[0, n) by descending key (n <= kCap).
__device__ void sort_candidates(Shared& sh, unsigned n) {
  unsigned size = 1;
  while (size < n) size <<= 1;
  for (unsigned i = n + threadIdx.x; i < size; i += kThreads) sh.cand[i] = 0;  // sorts last
  __syncthreads();
  for (unsigned k = 2; k <= size; k <<= 1) {
    for (unsigned j = k >> 1; j > 0; j >>= 1) {
      for (unsigned i = threadIdx.x; i < size; i += kThreads) {
        const unsigned p = i ^ j;
        if (p > i) {
          const u64 a = sh.cand[i], b = sh.cand[p];
          const bool descending = (i & k) == 0;
          if (descending ? a < b : a > b) sh.cand[i] = b, sh.cand[p] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Finds the first kept token (in key order) at which the running count (by_mass false) or mass
// (by_mass true) reaches target >= 1.
__device__ Found find_crossing(const float* s_row, int V, const Row& row, const Cut& cut,
                               bool by_mass, u64 target, Shared& sh) {
  const int tid = threadIdx.x;
  // ---- 1. which bin: scan the kept (count, mass) of the bins.
  {
    u64 c[2], m[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int b = 2 * tid + q;
      c[q] = b < cut.bin ? sh.bin_count[b] : b == cut.bin ? cut.count : 0;
      m[q] = b < cut.bin ? sh.bin_mass[b] : b == cut.bin ? cut.mass : 0;
    }
    u64 before_c = c[0] + c[1], before_m = m[0] + m[1], total_c, total_m;
    if (tid == 0) sh.sel = -1;
    block_scan2(before_c, before_m, total_c, total_m, sh);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const u64 before = by_mass ? before_m : before_c;
      const u64 here = by_mass ? m[q] : c[q];
      if (before < target && target <= before + here) {
        sh.sel = 2 * tid + q;
        sh.before_count = before_c;
        sh.before_mass = before_m;
      }
      before_c += c[q];
      before_m += m[q];
    }
    __syncthreads();
  }
  const int b = sh.sel;
  if (b < 0) return Found{0, -1, 0, 0, 0};
  const u64 bin_before_mass = sh.before_mass, bin_before_count = sh.before_count;

  // ---- 2. which token of bin b: gather, narrowing by radix digits while too many.
  u64 prefix = 0, mask = 0;
  int shift = 64;
  // Whether token i (scaled logit s, key) is still a candidate: in bin b, kept by the cut, and
  // matching the radix digits chosen so far.
  auto is_candidate = [&](float s, u64 key) {
    return row.bin(s) == b && !(b == cut.bin && key < cut.key) && (key & mask) == prefix;
  };
  while (true) {
    if (tid == 0) sh.num_cand = 0;
    __syncthreads();
    for (int i = tid; i < V; i += kThreads) {
      const float s = s_row[i];
      const u64 key = make_key(s, i);
      if (!is_candidate(s, key)) continue;
      const unsigned pos = atomicAdd(&sh.num_cand, 1u);
      if (pos < kCap) sh.cand[pos] = key;
    }
    __syncthreads();
    const unsigned n = sh.num_cand;
    if (n <= unsigned(kCap) || shift == 0) break;

    // Radix round: histogram the next 8 bits of the candidates' keys.
    shift -= 8;
    for (int d = tid; d < 256; d += kThreads) sh.radix_count[d] = 0, sh.radix_mass[d] = 0;
    __syncthreads();
    for (int i = tid; i < V; i += kThreads) {
      const float s = s_row[i];
      const u64 key = make_key(s, i);
      if (!is_candidate(s, key)) continue;
      const int digit = int((key >> shift) & 0xff);
      atomicAdd(&sh.radix_count[digit], 1u);
      atomicAdd(&sh.radix_mass[digit], row.mass(s));
    }
    __syncthreads();
    if (tid == 0) {  // digits from high (earlier in key order) to low
      u64 bc = sh.before_count, bm = sh.before_mass;
      int digit = 0;
      for (int d = 255; d >= 0; --d) {
        const u64 here = by_mass ? sh.radix_mass[d] : sh.radix_count[d];
        if ((by_mass ? bm : bc) + here >= target && here > 0) {
          digit = d;
          break;
        }
        bc += sh.radix_count[d];
        bm += sh.radix_mass[d];
      }
      sh.sel = digit;
      sh.before_count = bc;
      sh.before_mass = bm;
    }
    __syncthreads();
    prefix |= u64(sh.sel) << shift;
    mask |= u64(0xff) << shift;
  }

  // ---- 3. sort the candidates and scan them in key order.
  const unsigned n = min(sh.num_cand, unsigned(kCap));
  sort_candidates(sh, n);
  {
    u64 c[2], m[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const unsigned j = 2 * tid + q;
      c[q] = j < n ? 1 : 0;
      m[q] = j < n ? row.mass(from_order_bits(uint32_t(sh.cand[j] >> 32))) : 0;
    }
    u64 before_c = c[0] + c[1], before_m = m[0] + m[1], total_c, total_m;
    const u64 base_c = sh.before_count, base_m = sh.before_mass;
    if (tid == 0) sh.hit = 0;
    block_scan2(before_c, before_m, total_c, total_m, sh);
    before_c += base_c;
    before_m += base_m;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const u64 before = by_mass ? before_m : before_c;
      const u64 here = by_mass ? m[q] : c[q];
      if (here > 0 && before < target && target <= before + here) {
        sh.sel = 2 * tid + q;
        sh.hit = 1;
        sh.found.count_in_bin = unsigned(before_c + c[q] - bin_before_count);
        sh.found.mass_in_bin = before_m + m[q] - bin_before_mass;
        sh.found.mass_total = before_m + m[q];
      }
      before_c += c[q];
      before_m += m[q];
    }
    __syncthreads();
    if (tid == 0 && !sh.hit) {
      // No crossing (cannot happen with exact sums; kept as a guard): the last candidate.
      sh.sel = 0;
      u64 bc = base_c, bm = base_m;
      for (unsigned j = 0; j < n; ++j) {
        bc += 1;
        bm += row.mass(from_order_bits(uint32_t(sh.cand[j] >> 32)));
        if ((by_mass ? bm : bc) >= target || j + 1 == n) {
          sh.sel = int(j);
          sh.found.count_in_bin = unsigned(bc - bin_before_count);
          sh.found.mass_in_bin = bm - bin_before_mass;
          sh.found.mass_total = bm;
          break;
        }
      }
    }
    if (tid == 0) {
      sh.found.key = n > 0 ? sh.cand[sh.sel] : 0;
      sh.found.bin = b;
    }
    __syncthreads();
  }
  const Found f = sh.found;
  __syncthreads();
  return f;
}

template <typename In>
__device__ int argmax_row(const In* x, int V, Shared& sh) {
  float best = -INFINITY;
  int best_id = V;
  for (int i = threadIdx.x; i < V; i += kThreads) {
    const float v = to_float(x[i]);
    if (v > best || best_id == V) best = v, best_id = i;  // ascending i: first max kept
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int id = __shfl_xor_sync(0xffffffffu, best_id, o);
    if (v > best || (v == best && id < best_id)) best = v, best_id = id;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) sh.red[warp] = best, sh.red_idx[warp] = best_id;
  __syncthreads();
  if (warp == 0) {
    best = sh.red[lane];
    best_id = sh.red_idx[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best, o);
      const int id = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (v > best || (v == best && id < best_id)) best = v, best_id = id;
    }
  }
  return best_id;  // valid in thread 0
}

template <typename In>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(int32_t* __restrict__ next_tokens,  // [R]
                  const In* logits,                   // [R, ld]
                  int ld,
                  float* scratch,                     // [R, V] (may be logits itself)
                  DeviceSampling params, int V) {
  __shared__ Shared sh;
  pdl_launch_dependents();  // the advance (a decode run's step) may launch
  pdl_wait();               // the logits, and the step inputs, belong to the kernels before
  const int r = blockIdx.x, tid = threadIdx.x;
  const In* in_row = logits + int64_t(r) * ld;
  float* s_row = scratch + int64_t(r) * V;
  const float temperature = params.temperature[r];
  if (temperature == 0.f) {
    const int id = argmax_row(in_row, V, sh);
    if (tid == 0) next_tokens[r] = id;
    return;
  }

  // ---- scale (into scratch), max, min
  float local_max = -INFINITY, local_min = INFINITY;
  for (int i = tid; i < V; i += kThreads) {
    const float s = to_float(in_row[i]) / temperature;
    s_row[i] = s;
    local_max = fmaxf(local_max, s);
    local_min = fminf(local_min, s);
  }
  Row row;
  row.max = block_max<kThreads>(local_max, sh.red);
  const float min_s = -block_max<kThreads>(-local_min, sh.red);
  int bits = 0;
  while ((1LL << bits) < V) ++bits;
  row.shift = 62 - bits;
  const float zero_mass_from = float(row.shift) * 0.6931472f + 0.5f;  // exp(-d) * 2^shift < 1
  const float spread = row.max - min_s;
  row.range = zero_mass_from;
  const float binned = fminf(spread, zero_mass_from);
  row.bin_scale = binned > 0.f ? float(kBins) / binned : 0.f;

  // ---- histogram of (count, mass) per bin
  for (int b = tid; b < kBins; b += kThreads) sh.bin_count[b] = 0, sh.bin_mass[b] = 0;
  __syncthreads();
  for (int i = tid; i < V; i += kThreads) {
    const float s = s_row[i];
    const int b = row.bin(s);
    if (b < 0) continue;
    atomicAdd(&sh.bin_count[b], 1u);
    const u64 m = row.mass(s);
    if (m) atomicAdd(&sh.bin_mass[b], m);
  }
  __syncthreads();

  Cut cut;  // everything kept
  u64 kept_mass = 0;
  bool mass_known = false;
  const int top_k = params.top_k[r];
  if (top_k > 0 && top_k < V) {
    const Found f = find_crossing(s_row, V, row, cut, false, u64(top_k), sh);
    if (f.bin >= 0) {
      cut = Cut{f.bin, f.key, f.count_in_bin, f.mass_in_bin};
      kept_mass = f.mass_total;
      mass_known = true;
    }
  }
  if (!mass_known) {  // total mass of the (uncut) row
    u64 c = sh.bin_mass[2 * tid] + sh.bin_mass[2 * tid + 1], dummy = 0, total, total_dummy;
    block_scan2(c, dummy, total, total_dummy, sh);
    kept_mass = total;
  }
  const float top_p = params.top_p[r];
  if (top_p < 1.f) {
    double t = std::ceil(double(top_p) * double(kept_mass));
    const u64 target = u64(fmin(fmax(t, 1.0), double(kept_mass)));
    const Found f = find_crossing(s_row, V, row, cut, true, target, sh);
    cut = Cut{f.bin, f.key, f.count_in_bin, f.mass_in_bin};
    kept_mass = f.mass_total;
  }
  const double u = uniform_from_counter(params.seeds[r], params.counters[r]);
  u64 target = u64(std::floor(u * double(kept_mass))) + 1;
  if (target > kept_mass) target = kept_mass;
  const Found f = find_crossing(s_row, V, row, cut, true, target, sh);
  if (tid == 0) next_tokens[r] = key_id(f.key);
}

}  // namespace

template <typename In>
void launch_sample(int32_t* next_tokens, const In* logits, int ld, float* scratch,
                   const DeviceSampling& params, int num_rows, int vocab_size,
                   cudaStream_t stream, bool pdl) {
  if (num_rows <= 0) return;
  launch_kernel(sample_kernel<In>, dim3(num_rows), dim3(kThreads), 0, stream, pdl, next_tokens,
                logits, ld, scratch, params, vocab_size);
}

#define INSTANTIATE(In)                                                                        \
  template void launch_sample<In>(int32_t*, const In*, int, float*, const DeviceSampling&, int, \
                                  int, cudaStream_t, bool);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace pagedgpt2::cuda

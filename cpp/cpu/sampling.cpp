// CPU sampling: one token per row of logits.
//   temperature == 0      -> argmax (lowest index on ties)
//   else                  -> logits / temperature; keep the top_k highest (0 = all); softmax;
//                            keep the smallest most-probable set reaching top_p; draw by inverse
//                            CDF over the kept tokens in descending probability (ties: lower id)
// The draw u comes from a counter-based generator keyed by (seed, counter), so a request's
// samples depend only on its own seed and how many tokens it has drawn: reproducible whatever
// the batch around it, and the same function on the GPU.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cpu/ops.h"

namespace pagedgpt2::cpu {
namespace {

int argmax(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return best;
}

int sample_row(float* logits, int vocab_size, float temperature, int top_k, float top_p,
               double u) {
  if (temperature == 0.f) return argmax(logits, vocab_size);
  for (int i = 0; i < vocab_size; ++i) logits[i] /= temperature;
  // Candidates in descending logit order (ties: lower id first).
  const int k = (top_k > 0 && top_k < vocab_size) ? top_k : vocab_size;
  std::vector<int> ids(vocab_size);
  std::iota(ids.begin(), ids.end(), 0);
  auto higher = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), higher);
  ids.resize(k);
  // Softmax over the candidates, in double for a stable cumulative sum.
  std::vector<double> probs(k);
  double total = 0.0;
  for (int i = 0; i < k; ++i) total += probs[i] = std::exp(double(logits[ids[i]] - logits[ids[0]]));
  // top-p: the shortest prefix whose probability reaches top_p (at least one token).
  int kept = k;
  if (top_p < 1.f) {
    double cum = 0.0;
    for (int i = 0; i < k; ++i) {
      cum += probs[i] / total;
      if (cum >= double(top_p)) {
        kept = i + 1;
        break;
      }
    }
  }
  double kept_total = 0.0;
  for (int i = 0; i < kept; ++i) kept_total += probs[i];
  const double target = u * kept_total;
  double cum = 0.0;
  for (int i = 0; i < kept; ++i) {
    cum += probs[i];
    if (target < cum) return ids[i];
  }
  return ids[kept - 1];
}

}  // namespace

double uniform_from_counter(uint64_t seed, int64_t counter) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (uint64_t(counter) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return double(z >> 11) * 0x1.0p-53;
}

void sample(int32_t* next_tokens, float* logits, const SamplingInputs& params, int num_rows,
            int vocab_size) {
#pragma omp parallel for schedule(dynamic, 1) if (num_rows > 1)
  for (int r = 0; r < num_rows; ++r) {
    const double u = uniform_from_counter(params.seeds[r], params.counters[r]);
    next_tokens[r] = sample_row(logits + size_t(r) * vocab_size, vocab_size,
                                params.temperature[r], params.top_k[r], params.top_p[r], u);
  }
}

}  // namespace pagedgpt2::cpu

// CPU reference ops that touch each element a few times: LayerNorm, GELU, residual add and the
// write of new keys/values into their cache slots.
#include <cmath>
#include <cstring>

#include "cpu/ops.h"

namespace pagedgpt2::cpu {

void layernorm(float* out, const float* in, const float* weight, const float* bias,
               int num_tokens, int channels, float eps) {
#pragma omp parallel for schedule(static) if (num_tokens > 16)
  for (int t = 0; t < num_tokens; ++t) {
    const float* x = in + size_t(t) * channels;
    float* y = out + size_t(t) * channels;
    float mean = 0.f;
    for (int c = 0; c < channels; ++c) mean += x[c];
    mean /= channels;
    float var = 0.f;
    for (int c = 0; c < channels; ++c) var += (x[c] - mean) * (x[c] - mean);
    var /= channels;
    const float rstd = 1.f / std::sqrt(var + eps);
    for (int c = 0; c < channels; ++c) y[c] = (x[c] - mean) * rstd * weight[c] + bias[c];
  }
}

void gelu(float* x, int64_t n) {
  const float k = std::sqrt(2.f / float(M_PI));
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
  }
}

void residual_add(float* x, const float* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void write_kv(float* k_cache, float* v_cache, const float* qkv, const int32_t* slot_mapping,
              int num_tokens, int num_heads, int head_size) {
  const int C = num_heads * head_size;
  for (int t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding
    const float* row = qkv + size_t(t) * 3 * C;
    std::memcpy(k_cache + slot * C, row + C, sizeof(float) * C);
    std::memcpy(v_cache + slot * C, row + 2 * C, sizeof(float) * C);
  }
}

}  // namespace pagedgpt2::cpu

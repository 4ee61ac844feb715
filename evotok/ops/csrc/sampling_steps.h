// The generation sampler's CPU steps (depth_step_cpu.cpp, lm_step_cpu.cpp), bound into the CPU extension by
// rvq_cpu.cpp.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

// out (h) <- softmax-weighted sum of values[j] (h each) over the slots j < n that keep[j] allows (keep == nullptr:
// every slot), weights softmax_j(scale * q . keys[j]); s: n floats of scratch. One query, a few cached slots.
inline void attend_one(const float* q, const float* keys, const float* values, const bool* keep, int64_t n,
                       int64_t h, float scale, float* s, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (keep && !keep[j]) continue;
    float dot = 0.0f;
    for (int64_t e = 0; e < h; ++e) dot += q[e] * keys[j * h + e];
    s[j] = dot * scale;
    top = std::max(top, s[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = (keep && !keep[j]) ? 0.0f : std::exp(s[j] - top);
    total += s[j];
  }
  std::fill(out, out + h, 0.0f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t e = 0; e < h; ++e) out[e] += s[j] * values[j * h + e];
  for (int64_t e = 0; e < h; ++e) out[e] /= total;
}

torch::Tensor depth_step_cpu(torch::Tensor x, std::vector<torch::Tensor> kv, int64_t k,
                             std::vector<torch::Tensor> weights, torch::Tensor ln_f_w, torch::Tensor ln_f_b,
                             torch::Tensor head_w, torch::Tensor head_b, int64_t heads, double eps);

torch::Tensor lm_step_cpu(torch::Tensor x, std::vector<torch::Tensor> kv, int64_t t, torch::Tensor key_mask,
                          torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> weights,
                          std::vector<double> eps, torch::Tensor final_w, int64_t heads, int64_t kv_heads);

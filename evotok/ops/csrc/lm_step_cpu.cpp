// One decode step of a Llama / Qwen2-style LM on the CPU (evotok/models/lm_decode.py, LeanDecoder with
// impl="cpp"): every decoder layer and the final RMSNorm for one new slot per row, in one call.
//
// The same function as LeanDecoder's torch step: RMSNorm, q/k/v as one matrix (biases optional), rotary embedding
// (rotate-half convention) with the caller's cos / sin, the new key and value written into the caller's buffers at
// slot t, grouped-query attention of each query head over its key/value head's slots 0..t that the key mask
// keeps, the output projection, and a SiLU-gated MLP with gate and up as one matrix. Matrix products stay ATen's
// (addmm / mm into buffers allocated once per call); norms, rotary, attention, the gate and the residual adds are
// plain loops. At sampling sizes (32 rows, width 128) the torch step's ~60 operations cost more in dispatch than
// in arithmetic. Results match the torch step to float rounding (tested to 1e-5).
//
// Layouts (float32, contiguous): x (R, C); kv[l] (2, R, G, S, h), keys at [0], values at [1]; key_mask (R, S) bool;
// cos / sin (R, h); per layer 8 tensors: norm1.w (C), w_qkv ((H + 2G) h, C), b_qkv (or empty), w_o (C, H h),
// b_o (or empty), norm2.w (C), w_gate_up (2I, C), w_down (C, I); eps: one per layer norm (2 per layer), then the
// final norm's.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sampling_steps.h"

namespace {

constexpr int64_t kPerLayer = 8;

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), "lm_step_cpu: ", name,
              " must be a contiguous float32 CPU tensor");
}

void rms_norm_rows(const float* x, float* y, const float* w, int64_t R, int64_t C, double eps) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    double sq = 0.0;
    for (int64_t c = 0; c < C; ++c) sq += static_cast<double>(xr[c]) * xr[c];
    const float inv = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(C) + eps));
    for (int64_t c = 0; c < C; ++c) yr[c] = w[c] * (xr[c] * inv);
  }
}

// v (h) <- v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[h/2:], v[:h/2])
void rotate(float* v, const float* cos, const float* sin, int64_t h, float* tmp) {
  const int64_t half = h / 2;
  for (int64_t e = 0; e < half; ++e) tmp[e] = v[e] * cos[e] - v[e + half] * sin[e];
  for (int64_t e = half; e < h; ++e) tmp[e] = v[e] * cos[e] + v[e - half] * sin[e];
  std::copy(tmp, tmp + h, v);
}

void matmul_bias(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& w, const torch::Tensor& b) {
  if (b.numel())
    at::addmm_out(out, b, in, w.t());
  else
    at::mm_out(out, in, w.t());
}

}  // namespace

torch::Tensor lm_step_cpu(torch::Tensor x, std::vector<torch::Tensor> kv, int64_t t, torch::Tensor key_mask,
                          torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> weights,
                          std::vector<double> eps, torch::Tensor final_w, int64_t heads, int64_t kv_heads) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "lm_step_cpu: x must be (R, C)");
  const int64_t R = x.size(0), C = x.size(1), H = heads, G = kv_heads;
  TORCH_CHECK(!kv.empty() && weights.size() == kPerLayer * kv.size() && eps.size() == 2 * kv.size() + 1,
              "lm_step_cpu: ", kPerLayer, " weights and 2 eps per layer (+ the final eps) expected");
  TORCH_CHECK(G >= 1 && H % G == 0, "lm_step_cpu: heads ", H, " not a multiple of kv_heads ", G);
  const int64_t S = kv[0].size(3), h = kv[0].size(4);
  TORCH_CHECK(t >= 0 && t < S, "lm_step_cpu: slot ", t, " outside the buffers' ", S);
  TORCH_CHECK(h % 2 == 0, "lm_step_cpu: the head dim must be even");
  for (const auto& b : kv) {
    check_f32(b, "kv");
    TORCH_CHECK(b.sizes() == torch::IntArrayRef({2, R, G, S, h}), "lm_step_cpu: kv must be (2, R, G, S, h)");
  }
  for (const auto& w : weights)
    if (w.numel()) check_f32(w, "weights");
  check_f32(final_w, "final norm weight");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(cos.sizes() == torch::IntArrayRef({R, h}) && sin.sizes() == cos.sizes(), "lm_step_cpu: cos / sin (R, h)");
  TORCH_CHECK(key_mask.device().is_cpu() && key_mask.scalar_type() == torch::kBool && key_mask.is_contiguous() &&
                  key_mask.dim() == 2 && key_mask.size(0) == R && key_mask.size(1) >= S,
              "lm_step_cpu: key_mask must be a contiguous bool (R, >= S) CPU tensor");
  const int64_t I = weights[6].size(0) / 2, Q = (H + 2 * G) * h, mask_stride = key_mask.size(1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));

  auto state = x.clone();
  auto normed = torch::empty_like(state);
  auto branch = torch::empty_like(state);
  auto qkv = torch::empty({R, Q}, x.options());
  auto attn = torch::empty({R, H * h}, x.options());
  auto gate_up = torch::empty({R, 2 * I}, x.options());
  auto gated = torch::empty({R, I}, x.options());
  float* X = state.data_ptr<float>();
  float* XN = normed.data_ptr<float>();
  const float* B = branch.data_ptr<float>();
  const float* COS = cos.data_ptr<float>();
  const float* SIN = sin.data_ptr<float>();
  const bool* M = key_mask.data_ptr<bool>();
  std::vector<float> tmp(h), s(t + 1);
  for (size_t l = 0; l < kv.size(); ++l) {
    const torch::Tensor* w = &weights[kPerLayer * l];
    rms_norm_rows(X, XN, w[0].data_ptr<float>(), R, C, eps[2 * l]);
    matmul_bias(qkv, normed, w[1], w[2]);
    float* QKV = qkv.data_ptr<float>();
    float* K = kv[l].data_ptr<float>();
    float* V = K + R * G * S * h;
    float* A = attn.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) {
      float* row = QKV + r * Q;
      for (int64_t i = 0; i < H + G; ++i) rotate(row + i * h, COS + r * h, SIN + r * h, h, tmp.data());
      for (int64_t g = 0; g < G; ++g) {
        std::copy(row + (H + g) * h, row + (H + g + 1) * h, K + ((r * G + g) * S + t) * h);
        std::copy(row + (H + G + g) * h, row + (H + G + g + 1) * h, V + ((r * G + g) * S + t) * h);
      }
      const bool* keep = M + r * mask_stride;
      for (int64_t i = 0; i < H; ++i) {
        const int64_t g = i / (H / G);
        const float* q = row + i * h;
        const float* keys = K + (r * G + g) * S * h;
        const float* values = V + (r * G + g) * S * h;
        attend_one(q, keys, values, keep, t + 1, h, scale, s.data(), A + r * H * h + i * h);
      }
    }
    matmul_bias(branch, attn, w[3], w[4]);
    for (int64_t e = 0; e < R * C; ++e) X[e] += B[e];
    rms_norm_rows(X, XN, w[5].data_ptr<float>(), R, C, eps[2 * l + 1]);
    at::mm_out(gate_up, normed, w[6].t());
    const float* GU = gate_up.data_ptr<float>();
    float* GT = gated.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t e = 0; e < I; ++e) {
        const float a = GU[r * 2 * I + e];
        GT[r * I + e] = a / (1.0f + std::exp(-a)) * GU[r * 2 * I + I + e];
      }
    at::mm_out(branch, gated, w[7].t());
    for (int64_t e = 0; e < R * C; ++e) X[e] += B[e];
  }
  auto out = torch::empty_like(state);
  rms_norm_rows(X, out.data_ptr<float>(), final_w.data_ptr<float>(), R, C, eps.back());
  return out;
}

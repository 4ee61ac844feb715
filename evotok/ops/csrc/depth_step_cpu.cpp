// One sampling step of the generation stage's depth transformer on the CPU (evotok/models/depth_transformer.py,
// DepthCache with impl="cpp"): the same function as _Block.step over every block, the final LayerNorm and the
// depth's classifier, in one call.
//
// At sampling sizes (32 rows, width 64) each of the PyTorch step's ~25 operations costs more in dispatch and
// allocation than in arithmetic. Here the matrix products stay ATen's (addmm into buffers allocated once per
// call), and the cheap parts are plain loops: LayerNorm (two-pass, double accumulation), writing the new key and
// value into the caller's buffers, single-query attention over the <= D depths so far (at depth 0 the one key's
// weight is exactly 1, so the output is its value, as in the PyTorch step), and the residual adds. GELU is
// ATen's exact (erf) one. Results match the PyTorch step to float rounding (tested to 1e-5).
//
// Layouts (all float32, contiguous): x (N, C); kv[l] (2, N, H, D, h) with keys at [0] and values at [1];
// weights: 12 per block, in order ln1.w, ln1.b, qkv.w (3C, C), qkv.b, proj.w (C, C), proj.b, ln2.w, ln2.b,
// fc1.w (F, C), fc1.b, fc2.w (C, F), fc2.b; head_w (C, K), head_b (K).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sampling_steps.h"

namespace {

constexpr int64_t kMaxDepth = 256;
constexpr int64_t kPerBlock = 12;

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), "depth_step_cpu: ",
              name, " must be a contiguous float32 CPU tensor");
}

void layer_norm_rows(const float* x, float* y, const float* g, const float* b, int64_t N, int64_t C, double eps) {
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    float* yr = y + n * C;
    double mean = 0.0;
    for (int64_t c = 0; c < C; ++c) mean += xr[c];
    mean /= static_cast<double>(C);
    double var = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double d = xr[c] - mean;
      var += d * d;
    }
    var /= static_cast<double>(C);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * rstd * g[c] + b[c];
  }
}

// a (N, C) <- attention of each row's newest query over its keys / values of depths 0..k (one head at a time)
void attend(const float* qkv, float* kv, float* a, int64_t N, int64_t H, int64_t D, int64_t h, int64_t k) {
  const int64_t C = H * h;
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  float s[kMaxDepth];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t hh = 0; hh < H; ++hh) {
      float* keys = kv + (n * H + hh) * D * h;
      float* values = kv + ((N + n) * H + hh) * D * h;
      const float* q = qkv + n * 3 * C + hh * h;
      std::copy(q + C, q + C + h, keys + k * h);
      std::copy(q + 2 * C, q + 2 * C + h, values + k * h);
      float* out = a + n * C + hh * h;
      if (k == 0) {
        std::copy(values, values + h, out);
        continue;
      }
      attend_one(q, keys, values, nullptr, k + 1, h, scale, s, out);
    }
  }
}

void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

torch::Tensor depth_step_cpu(torch::Tensor x, std::vector<torch::Tensor> kv, int64_t k,
                             std::vector<torch::Tensor> weights, torch::Tensor ln_f_w, torch::Tensor ln_f_b,
                             torch::Tensor head_w, torch::Tensor head_b, int64_t heads, double eps) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "depth_step_cpu: x must be (N, C)");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(heads >= 1 && C % heads == 0, "depth_step_cpu: width ", C, " is not a multiple of heads ", heads);
  const int64_t H = heads, h = C / heads;
  TORCH_CHECK(!kv.empty() && weights.size() == kPerBlock * kv.size(), "depth_step_cpu: ", kPerBlock,
              " weights per block expected, got ", weights.size(), " for ", kv.size(), " blocks");
  const int64_t D = kv[0].size(3);
  TORCH_CHECK(k >= 0 && k < D && D <= kMaxDepth, "depth_step_cpu: depth ", k, " outside the buffers' ", D);
  for (const auto& t : kv) {
    check_f32(t, "kv");
    TORCH_CHECK(t.sizes() == torch::IntArrayRef({2, N, H, D, h}), "depth_step_cpu: kv must be (2, N, H, D, h)");
  }
  for (const auto& w : weights) check_f32(w, "weights");
  for (const auto* t : {&ln_f_w, &ln_f_b, &head_w, &head_b}) check_f32(*t, "head weights");
  const int64_t F = weights[8].size(0);

  auto state = x.clone();  // the residual stream, updated in place
  auto normed = torch::empty_like(state);
  auto attn = torch::empty_like(state);
  auto branch = torch::empty_like(state);
  auto qkv = torch::empty({N, 3 * C}, x.options());
  auto hidden = torch::empty({N, F}, x.options());
  float* X = state.data_ptr<float>();
  float* XN = normed.data_ptr<float>();
  const float* B = branch.data_ptr<float>();
  for (size_t l = 0; l < kv.size(); ++l) {
    const torch::Tensor* w = &weights[kPerBlock * l];
    layer_norm_rows(X, XN, w[0].data_ptr<float>(), w[1].data_ptr<float>(), N, C, eps);
    at::addmm_out(qkv, w[3], normed, w[2].t());
    attend(qkv.data_ptr<float>(), kv[l].data_ptr<float>(), attn.data_ptr<float>(), N, H, D, h, k);
    at::addmm_out(branch, w[5], attn, w[4].t());
    add_into(X, B, N * C);
    layer_norm_rows(X, XN, w[6].data_ptr<float>(), w[7].data_ptr<float>(), N, C, eps);
    at::addmm_out(hidden, w[9], normed, w[8].t());
    at::gelu_(hidden);
    at::addmm_out(branch, w[11], hidden, w[10].t());
    add_into(X, B, N * C);
  }
  layer_norm_rows(X, XN, ln_f_w.data_ptr<float>(), ln_f_b.data_ptr<float>(), N, C, eps);
  return at::addmm(head_b, normed, head_w);
}

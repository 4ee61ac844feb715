// Fused residual-VQ assignment on the CPU (see evotok/ops/rvq.py for the contract).
//
// For every vector and every depth l: code = argmin_k (||c_k||^2 - 2 x.c_k) in fp32, lowest index on
// ties, then x -= c_code. No N x K distance matrix and no packed copy of the codebook is built.
//
// Layout of the work (one parallel region per depth, rows split in blocks of kRowBlock over threads):
//   * the row block's residuals are transposed into a per-thread buffer xT[group][d][kRowGroup]
//     (kRowGroup = kNV * W rows, W = SIMD width), so one SIMD load gives kRowGroup rows of one dim;
//   * codes are read in place from the row-major codebook (K x d) and broadcast one element at a time;
//     the codebook is swept in chunks of about kChunkBytes so a chunk stays in L2 while every row group
//     of the block passes over it;
//   * micro-kernel: kMR codes x kNV SIMD vectors of rows, kMR * kNV accumulators held in registers;
//     after the d-loop each accumulator becomes a distance fma(-2, acc, ||c||^2) and updates the running
//     (best, index) of its row lanes with a strict '<', so codes visited in increasing order keep the
//     lowest index on ties;
//   * ||c||^2 is computed once per depth into a K-float buffer, summed sequentially over d.
// The dot product is summed sequentially over d (k = 0..d-1) with fused multiply-adds, exactly as the
// CUDA kernel does, so both produce bitwise identical distances.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "sampling_steps.h"

#if defined(__AVX512F__)
#include <immintrin.h>
namespace simd {
constexpr int W = 16;
constexpr const char* kName = "avx512";
using vf = __m512;
using vi = __m512i;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vi loadi(const int32_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
inline void storei(int32_t* p, vi v) { _mm512_storeu_si512(reinterpret_cast<void*>(p), v); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vi set1i(int32_t x) { return _mm512_set1_epi32(x); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline void update(vf dist, vi idx, vf& best, vi& bidx) {
  const __mmask16 m = _mm512_cmp_ps_mask(dist, best, _CMP_LT_OQ);
  best = _mm512_mask_mov_ps(best, m, dist);
  bidx = _mm512_mask_mov_epi32(bidx, m, idx);
}
}  // namespace simd
#ifndef EVOTOK_RVQ_MR
#define EVOTOK_RVQ_MR 4
#endif
#ifndef EVOTOK_RVQ_NV
#define EVOTOK_RVQ_NV 3
#endif
constexpr int kMR = EVOTOK_RVQ_MR;  // codes per micro-kernel
constexpr int kNV = EVOTOK_RVQ_NV;  // SIMD vectors of rows per micro-kernel
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
namespace simd {
constexpr int W = 8;
constexpr const char* kName = "avx2";
using vf = __m256;
using vi = __m256i;
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vi loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void storei(int32_t* p, vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vi set1i(int32_t x) { return _mm256_set1_epi32(x); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline void update(vf dist, vi idx, vf& best, vi& bidx) {
  const vf m = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
  best = _mm256_blendv_ps(best, dist, m);
  bidx = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(bidx), _mm256_castsi256_ps(idx), m));
}
}  // namespace simd
constexpr int kMR = 6;
constexpr int kNV = 2;
#else
namespace simd {  // portable scalar fallback (non-x86 hosts)
constexpr int W = 1;
constexpr const char* kName = "scalar";
using vf = float;
using vi = int32_t;
inline vf load(const float* p) { return *p; }
inline void store(float* p, vf v) { *p = v; }
inline vi loadi(const int32_t* p) { return *p; }
inline void storei(int32_t* p, vi v) { *p = v; }
inline vf set1(float x) { return x; }
inline vi set1i(int32_t x) { return x; }
inline vf zero() { return 0.f; }
inline vf fma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline void update(vf dist, vi idx, vf& best, vi& bidx) {
  if (dist < best) { best = dist; bidx = idx; }
}
}  // namespace simd
constexpr int kMR = 4;
constexpr int kNV = 4;
#endif

namespace {

constexpr int kRowGroup = kNV * simd::W;            // rows per micro-kernel
constexpr int64_t kRowBlock = 8 * kRowGroup;        // rows per parallel task (384 with AVX-512)
constexpr int64_t kChunkBytes = 192 * 1024;         // codebook bytes swept per pass (stays in L2)

// kMR_ codes [j0, j0 + kMR_) against one row group; updates best/bidx (kNV vectors each) in place.
template <int kMR_>
inline void micro_kernel(const float* __restrict xg,   // [d][kRowGroup]
                         const float* __restrict C,    // K x d, row-major
                         const float* __restrict c2,   // K
                         int64_t j0, int64_t d, simd::vf* best, simd::vi* bidx) {
  simd::vf acc[kMR_][kNV];
  for (int j = 0; j < kMR_; ++j)
    for (int v = 0; v < kNV; ++v) acc[j][v] = simd::zero();
  const float* cj = C + j0 * d;
  for (int64_t k = 0; k < d; ++k) {
    simd::vf xv[kNV];
    for (int v = 0; v < kNV; ++v) xv[v] = simd::load(xg + k * kRowGroup + v * simd::W);
    for (int j = 0; j < kMR_; ++j) {
      const simd::vf cb = simd::set1(cj[j * d + k]);
      for (int v = 0; v < kNV; ++v) acc[j][v] = simd::fma(cb, xv[v], acc[j][v]);
    }
  }
  const simd::vf m2 = simd::set1(-2.0f);
  for (int j = 0; j < kMR_; ++j) {  // increasing code index: strict '<' keeps the lowest on ties
    const simd::vf c2j = simd::set1(c2[j0 + j]);
    const simd::vi idx = simd::set1i(static_cast<int32_t>(j0 + j));
    for (int v = 0; v < kNV; ++v) simd::update(simd::fma(m2, acc[j][v], c2j), idx, best[v], bidx[v]);
  }
}

// Squared norms, summed sequentially over d with fma (same order as the CUDA kernel).
void code_norms(const float* C, int64_t K, int64_t d, float* c2) {
  at::parallel_for(0, K, 2048, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const float* c = C + j * d;
      float s = 0.f;
      for (int64_t k = 0; k < d; ++k) s = std::fma(c[k], c[k], s);
      c2[j] = s;
    }
  });
}

void assign_depth(float* R, const float* C, const float* c2, int64_t* codes, int64_t N, int64_t K,
                  int64_t d, int64_t L, int64_t l) {
  int64_t chunk = std::max<int64_t>(kMR, kChunkBytes / (d * static_cast<int64_t>(sizeof(float))));
  chunk = (chunk / kMR) * kMR;
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks)));
  // dynamic schedule: on a shared machine a descheduled thread does not hold the others back
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> xT(static_cast<size_t>(kRowBlock * d));
    std::vector<float> bestv(static_cast<size_t>(kRowBlock));
    std::vector<int32_t> besti(static_cast<size_t>(kRowBlock));
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t r0 = blk * kRowBlock;
      const int64_t nr = std::min(kRowBlock, N - r0);
      const int64_t ngroups = (nr + kRowGroup - 1) / kRowGroup;
      // transpose the block's residuals into [group][d][kRowGroup], zero padding beyond N
      for (int64_t g = 0; g < ngroups; ++g) {
        float* xg = xT.data() + g * d * kRowGroup;
        for (int r = 0; r < kRowGroup; ++r) {
          const int64_t row = r0 + g * kRowGroup + r;
          if (row < N) {
            const float* src = R + row * d;
            for (int64_t k = 0; k < d; ++k) xg[k * kRowGroup + r] = src[k];
          } else {
            for (int64_t k = 0; k < d; ++k) xg[k * kRowGroup + r] = 0.f;
          }
        }
      }
      std::fill(bestv.begin(), bestv.end(), std::numeric_limits<float>::infinity());
      std::fill(besti.begin(), besti.end(), 0);
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t k1 = std::min(K, k0 + chunk);
        const int64_t kmain = k0 + ((k1 - k0) / kMR) * kMR;
        for (int64_t g = 0; g < ngroups; ++g) {
          const float* xg = xT.data() + g * d * kRowGroup;
          simd::vf best[kNV];
          simd::vi bidx[kNV];
          for (int v = 0; v < kNV; ++v) {
            best[v] = simd::load(bestv.data() + g * kRowGroup + v * simd::W);
            bidx[v] = simd::loadi(besti.data() + g * kRowGroup + v * simd::W);
          }
          int64_t j = k0;
          for (; j < kmain; j += kMR) micro_kernel<kMR>(xg, C, c2, j, d, best, bidx);
          for (; j < k1; ++j) micro_kernel<1>(xg, C, c2, j, d, best, bidx);
          for (int v = 0; v < kNV; ++v) {
            simd::store(bestv.data() + g * kRowGroup + v * simd::W, best[v]);
            simd::storei(besti.data() + g * kRowGroup + v * simd::W, bidx[v]);
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        const int32_t code = besti[r];
        codes[row * L + l] = code;
        const float* c = C + static_cast<int64_t>(code) * d;
        float* x = R + row * d;
        for (int64_t k = 0; k < d; ++k) x[k] -= c[k];
      }
    }
  }
}

}  // namespace

// x_Nd: float32 contiguous (N, d); codebooks_LKd: float32 contiguous (L, K, d). Validation of shapes,
// dtypes and finiteness happens in Python (evotok/ops/rvq.py); the checks here only guard memory safety.
std::vector<torch::Tensor> rvq_assign_cpu(torch::Tensor x_Nd, torch::Tensor codebooks_LKd) {
  TORCH_CHECK(x_Nd.dim() == 2 && codebooks_LKd.dim() == 3, "rvq_assign_cpu: bad ranks");
  TORCH_CHECK(x_Nd.scalar_type() == at::kFloat && codebooks_LKd.scalar_type() == at::kFloat,
              "rvq_assign_cpu: float32 only");
  TORCH_CHECK(x_Nd.is_contiguous() && codebooks_LKd.is_contiguous(), "rvq_assign_cpu: contiguous only");
  TORCH_CHECK(!x_Nd.is_cuda() && !codebooks_LKd.is_cuda(), "rvq_assign_cpu: CPU tensors only");
  const int64_t N = x_Nd.size(0), d = x_Nd.size(1);
  const int64_t L = codebooks_LKd.size(0), K = codebooks_LKd.size(1);
  TORCH_CHECK(codebooks_LKd.size(2) == d, "rvq_assign_cpu: d mismatch");
  TORCH_CHECK(K >= 1 && K <= std::numeric_limits<int32_t>::max(), "rvq_assign_cpu: bad K");
  auto residual = x_Nd.clone();
  auto codes = torch::zeros({N, L}, x_Nd.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {codes, residual};
  std::vector<float> c2(static_cast<size_t>(K));
  float* R = residual.data_ptr<float>();
  const float* CB = codebooks_LKd.data_ptr<float>();
  int64_t* out = codes.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    const float* C = CB + l * K * d;
    code_norms(C, K, d, c2.data());
    assign_depth(R, C, c2.data(), out, N, K, d, L, l);
  }
  return {codes, residual};
}

// EMA statistics without a one-hot: sums[r] = sum of src[m] over m with idx[m] == r (ascending m, as
// index_add_), counts[r] = number of such m. Each thread owns a contiguous range of output rows and
// scans all of idx, so no atomics and a deterministic order.
std::vector<torch::Tensor> rvq_accumulate_cpu(torch::Tensor idx, torch::Tensor src, int64_t rows) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous(), "idx: 1-D int64");
  TORCH_CHECK(src.dim() == 2 && src.scalar_type() == at::kFloat && src.is_contiguous(), "src: 2-D float32");
  TORCH_CHECK(src.size(0) == idx.size(0), "idx and src lengths differ");
  const int64_t M = idx.size(0), d = src.size(1);
  auto sums = torch::zeros({rows, d}, src.options());
  auto counts = torch::zeros({rows}, src.options());
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* S = src.data_ptr<float>();
  float* O = sums.data_ptr<float>();
  float* C = counts.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(I[m] >= 0 && I[m] < rows, "index out of range");
  const int nthreads = at::get_num_threads();
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = rows * t / T, hi = rows * (t + 1) / T;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t r = I[m];
      if (r < lo || r >= hi) continue;
      float* o = O + r * d;
      const float* s = S + m * d;
      for (int64_t k = 0; k < d; ++k) o[k] += s[k];
      C[r] += 1.f;
    }
  }
  return {sums, counts};
}

std::string rvq_simd_name() { return simd::kName; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rvq_assign_cpu", &rvq_assign_cpu, "fused residual-VQ assignment (CPU)");
  m.def("rvq_accumulate_cpu", &rvq_accumulate_cpu, "per-row sums and counts of src grouped by idx");
  m.def("simd_name", &rvq_simd_name, "SIMD path compiled in (avx512 | avx2 | scalar)");
  m.def("depth_step_cpu", &depth_step_cpu, "one sampling step of the depth transformer (depth_step_cpu.cpp)");
  m.def("lm_step_cpu", &lm_step_cpu, "one decode step of a Llama / Qwen2-style LM (lm_step_cpu.cpp)");
}

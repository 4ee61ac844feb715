// Fused residual-VQ assignment on CUDA (see evotok/ops/rvq.py for the contract).
//
// One launch for all depths. Each thread owns one vector; a block of kThreads vectors walks each
// depth's codebook in tiles of TK codes staged in shared memory (||c||^2 of the tile computed there
// too), keeping a running (best distance, index) per vector with a strict '<' over increasing code
// indices, so ties go to the lowest index. No N x K buffer exists. For d in {8, 16, 32, 64} the
// residual lives in registers (template D); other d keep it in the output residual in global memory.
// Distances: fmaf(-2, dot, ||c||^2), dot summed sequentially over d with fmaf, exactly like the
// C++ kernel, so the two agree bitwise.
// This file includes no torch header, so nvcc compiles it in seconds; the torch binding lives in
// rvq_cuda_bind.cpp (host compiler).
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreads = 128;
constexpr int kTileBytes = 32 * 1024;

__device__ __forceinline__ float tile_dot_generic(const float* __restrict__ r, const float* __restrict__ c, int d) {
  float s = 0.f;
  for (int k = 0; k < d; ++k) s = fmaf(r[k], c[k], s);
  return s;
}

template <int D>
__global__ void rvq_kernel(float* __restrict__ res,          // N x d, in: x, out: residual
                           const float* __restrict__ cb,     // L x K x d
                           int64_t* __restrict__ codes,      // N x L
                           int64_t N, int K, int d, int L, int TK) {
  extern __shared__ __align__(16) float smem[];
  float* cs = smem;            // TK x d
  float* c2s = smem + TK * d;  // TK
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < N;
  float r[D > 0 ? D : 1];
  if (D > 0 && active) {
#pragma unroll
    for (int k = 0; k < D; ++k) r[k] = res[i * D + k];
  }
  float* rg = res + (active ? i * d : 0);  // generic path: residual row in global memory

  for (int l = 0; l < L; ++l) {
    const float* C = cb + static_cast<int64_t>(l) * K * d;
    float best = CUDART_INF_F;
    int bidx = 0;
    for (int t0 = 0; t0 < K; t0 += TK) {
      const int tk = min(TK, K - t0);
      __syncthreads();  // previous tile fully consumed
      const float* src = C + static_cast<int64_t>(t0) * d;
      for (int e = threadIdx.x; e < tk * d; e += blockDim.x) cs[e] = src[e];
      __syncthreads();
      for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < d; ++k) s = fmaf(cs[j * d + k], cs[j * d + k], s);
        c2s[j] = s;
      }
      __syncthreads();
      if (active) {
        for (int j = 0; j < tk; ++j) {
          float dot;
          if constexpr (D > 0) {
            const float4* c4 = reinterpret_cast<const float4*>(cs + j * D);
            dot = 0.f;
#pragma unroll
            for (int q = 0; q < D / 4; ++q) {
              const float4 c = c4[q];
              dot = fmaf(r[4 * q + 0], c.x, dot);
              dot = fmaf(r[4 * q + 1], c.y, dot);
              dot = fmaf(r[4 * q + 2], c.z, dot);
              dot = fmaf(r[4 * q + 3], c.w, dot);
            }
          } else {
            dot = tile_dot_generic(rg, cs + j * d, d);
          }
          const float dist = fmaf(-2.f, dot, c2s[j]);
          if (dist < best) {  // strict: the lowest index wins ties
            best = dist;
            bidx = t0 + j;
          }
        }
      }
    }
    if (active) {
      codes[i * L + l] = bidx;
      const float* c = C + static_cast<int64_t>(bidx) * d;
      if constexpr (D > 0) {
#pragma unroll
        for (int k = 0; k < D; ++k) r[k] -= c[k];
      } else {
        for (int k = 0; k < d; ++k) rg[k] -= c[k];
      }
    }
  }
  if (D > 0 && active) {
#pragma unroll
    for (int k = 0; k < D; ++k) res[i * D + k] = r[k];
  }
}

template <int D>
cudaError_t launch(float* res, const float* cb, int64_t* codes, int64_t N, int K, int d, int L,
                   cudaStream_t stream) {
  int TK = kTileBytes / static_cast<int>(sizeof(float) * (d + 1));
  TK = std::max(1, std::min(TK, 512));
  const size_t smem = static_cast<size_t>(TK) * (d + 1) * sizeof(float);
  const int64_t blocks = (N + kThreads - 1) / kThreads;
  rvq_kernel<D><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(res, cb, codes, N, K, d, L, TK);
  return cudaGetLastError();
}

}  // namespace

// res: N x d float32 (in: x, out: residual); cb: L x K x d float32; codes: N x L int64. All device
// pointers, contiguous. Requires 1 <= d <= 8191 (tile of at least one code in 32 KiB of shared memory).
cudaError_t evotok_rvq_cuda_launch(float* res, const float* cb, int64_t* codes, int64_t N, int K, int d,
                                   int L, cudaStream_t stream) {
  if (N == 0 || L == 0) return cudaSuccess;
  switch (d) {
    case 8: return launch<8>(res, cb, codes, N, K, d, L, stream);
    case 16: return launch<16>(res, cb, codes, N, K, d, L, stream);
    case 32: return launch<32>(res, cb, codes, N, K, d, L, stream);
    case 64: return launch<64>(res, cb, codes, N, K, d, L, stream);
    default: return launch<0>(res, cb, codes, N, K, d, L, stream);
  }
}

// Residual-VQ assignment on CUDA (see evotok/ops/rvq.py for the contract).
//
// Why split over codes: one thread per vector (the previous design) gives N / 128 = 64 blocks at the
// paper's shape (N = 8192 vectors per GPU, K = 32768, d = 32, L = 16), far fewer than an H100/H200
// keeps resident. Here each depth is a 2-D grid: blockIdx.x = a tile of kBN = 128 vectors,
// blockIdx.y = a slice of whole code tiles (kBK = 128 codes each), the number of slices chosen so the
// grid holds about kBlocksPerSM blocks per SM (2048 blocks at the paper's shape on 132 SMs).
//
// Per depth l, three stream-ordered steps (no N x K buffer anywhere):
//   1. memset keys (N x uint64) to all-ones, the empty key;
//   2. argmin_kernel: 256 threads = 16 (ty) x 16 (tx); a thread owns the 8 vectors {4ty..4ty+3,
//      64+4ty..64+4ty+3} and the 8 codes {4tx..4tx+3, 64+4tx..64+4tx+3} of a tile (float4 reads from
//      shared memory without bank conflicts), i.e. a register micro-tile of 8 x 8 dot products.
//      Residual and code tiles sit in shared memory dims-major (As[dim][vector], Bs[dim][code]); codes
//      are staged in chunks of DC dims, the residual tile once per block when d <= DA (else with each
//      chunk; DA, DC: struct Tile). The dot product is
//      summed sequentially over d (k = 0..d-1, across chunks) with fmaf from 0, the distance is
//      fmaf(-2, dot, ||c||^2): the same operations in the same order as csrc/rvq_cpu.cpp, so the two
//      agree bitwise. Dims past d and vectors past N are zero-padded; codes past K get ||c||^2 = +inf,
//      so their distance is +inf and never wins.
//      A thread visits its codes in increasing index and keeps (best, index) with a strict '<' from
//      +inf, so it holds the lowest index among its minima. Candidates are packed into one 64-bit key,
//      (order-preserving uint32 of the distance) << 32 | code: unsigned order of the keys is the order
//      of (distance, code), negative distances included, -0 mapped to +0 first (they compare equal).
//      A min over the 16 tx lanes (warp shuffles) and one atomicMin per vector and block combine the
//      slices: the result is the lowest distance and, on equal fp32 distances, the lowest index.
//   3. finalize_kernel: decode the code (the empty key, reached only if every distance is +inf or NaN,
//      gives code 0 as in ref), write codes[i, l], residual -= code vector (in global memory).
// ||c||^2 of all L x K codes is computed once per call (code_norms_kernel, sequential fmaf over d) into
// a caller-provided scratch buffer. d is specialised at compile time for 8, 16, 32 and 64 (DA = d;
// DC = d, 16 for d = 64); any other d in [1, 8191] takes the generic path (DA = DC = 16, the last chunk
// zero-padded: fmaf(0, 0, s) = s, up to the sign of a zero dot, which cannot change fmaf(-2, dot, c2)).
// Every kernel is free of register spills on sm_90 (tests/test_ops_rvq.py checks ptxas's report).
// This file includes no torch header, so nvcc compiles it in seconds; the torch binding lives in
// rvq_cuda_bind.cpp (host compiler).
#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>
#include <cstdint>

namespace {

constexpr int kThreads = 256;  // 16 x 16 threads per block
constexpr int kTM = 8;         // vectors per thread
constexpr int kTN = 8;         // codes per thread
constexpr int kBN = 128;       // vectors per block: 16 * kTM
constexpr int kBK = 128;       // codes per tile: 16 * kTN
constexpr int kHalf = 64;      // a thread's second group of 4 vectors / codes starts here
constexpr int kPad = 4;        // shared-memory row padding, a multiple of 4 (float4 alignment)
constexpr int kBlocksPerSM = 16;  // target grid size for the split over codes, per SM
constexpr unsigned long long kEmptyKey = ~0ull;

static_assert(kBN == 16 * kTM && kBK == 16 * kTN && kThreads == 256, "tile shape");
static_assert(kTM == 8 && kTN == 8 && kHalf == 64, "the float4 layout assumes 2 x 4 per thread");
static_assert(kBN == kBK, "stage_tile stages both tiles with one row count");

// DA: dims of the residual tile held in shared memory (the whole vector when d <= DA, so it is staged
// once per block); DC: dims of a code chunk. 64 x 132 + 16 x 132 floats + 128 = 42 KiB for d = 64, under
// the 48 KiB of static shared memory.
template <int D>
struct Tile {
  static constexpr int DA = (D > 0 && D <= 64) ? D : 16;
  static constexpr int DC = (D > 0 && D <= 32) ? D : 16;
  static constexpr int U = D > 0 ? 4 : 1;  // the generic path spills with more loads in flight
};

// Monotone map of a non-NaN float to uint32 (a < b <=> key(a) < key(b)); -0 and +0 both map to key(+0).
__device__ __forceinline__ unsigned int order_key(float f) {
  const unsigned int u = __float_as_uint(f == 0.f ? 0.f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long pack_key(float dist, int code) {
  return (static_cast<unsigned long long>(order_key(dist)) << 32) | static_cast<unsigned int>(code);
}

// Row r of the thread's micro-tile -> local vector / code index in the block tile (increasing in r).
__device__ __forceinline__ int local_index(int t, int r) { return r < 4 ? 4 * t + r : kHalf + 4 * t + (r - 4); }

// dst[kk][j] = src[(row0 + j) * d + c0 + kk] for j < kBN, kk < R; zero outside rows < nrows, dims < d.
// U: loads in flight per thread (unroll factor), limited where registers are short.
template <int R, int U>
__device__ __forceinline__ void stage_tile(float (*dst)[kBN + kPad], const float* __restrict__ src,
                                           int64_t row0, int64_t nrows, int d, int c0) {
#pragma unroll U
  for (int e = threadIdx.x; e < kBN * R; e += kThreads) {
    const int j = e / R, kk = e % R;
    const int64_t row = row0 + j;
    const int k = c0 + kk;
    dst[kk][j] = (row < nrows && k < d) ? src[row * d + k] : 0.f;
  }
}

// One depth: keys[i] = min over this block's codes of pack_key(distance, code), combined by atomicMin.
template <int D>
__global__ void __launch_bounds__(kThreads, 2)
argmin_kernel(const float* __restrict__ res,         // N x d residuals
              const float* __restrict__ C,           // K x d codes of this depth
              const float* __restrict__ c2,          // K squared norms of this depth
              unsigned long long* __restrict__ keys,  // N packed keys, all-ones on entry
              int64_t N, int K, int d_runtime, int tiles_per_slice) {
  constexpr int DA = Tile<D>::DA, DC = Tile<D>::DC;
  __shared__ __align__(16) float As[DA][kBN + kPad];  // residuals, dims-major
  __shared__ __align__(16) float Bs[DC][kBK + kPad];  // codes, dims-major
  __shared__ float c2s[kBK];

  const int d = D > 0 ? D : d_runtime;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int tiles = (K + kBK - 1) / kBK;
  const int t_begin = static_cast<int>(blockIdx.y) * tiles_per_slice;
  const int t_end = min(tiles, t_begin + tiles_per_slice);
  const int nchunks = (d + DC - 1) / DC;
  const bool resident = d <= DA;  // uniform over the block: the residual tile is staged once

  float best[kTM];
  int bidx[kTM];
#pragma unroll
  for (int r = 0; r < kTM; ++r) {
    best[r] = CUDART_INF_F;
    bidx[r] = 0;
  }
  if (resident) stage_tile<DA, Tile<D>::U>(As, res, n0, N, d, 0);  // visible after the first barrier below

  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * kBK;  // k0 + kBK - 1 <= INT_MAX: the launcher requires K <= INT_MAX - kBK
    float acc[kTM][kTN];
#pragma unroll
    for (int r = 0; r < kTM; ++r)
#pragma unroll
      for (int s = 0; s < kTN; ++s) acc[r][s] = 0.f;

#pragma unroll 1
    for (int ch = 0; ch < nchunks; ++ch) {
      const int c0 = ch * DC;
      const int arow = resident ? c0 : 0;  // As row of this chunk's first dim
      __syncthreads();  // everyone is done reading As / Bs / c2s of the previous chunk or tile
      if (!resident) stage_tile<DC, Tile<D>::U>(As, res, n0, N, d, c0);
      stage_tile<DC, Tile<D>::U>(Bs, C, k0, K, d, c0);
      if (ch == 0) {
        for (int j = threadIdx.x; j < kBK; j += kThreads) c2s[j] = (k0 + j < K) ? c2[k0 + j] : CUDART_INF_F;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < DC; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(&As[arow + kk][4 * ty]);
        const float4 a1 = *reinterpret_cast<const float4*>(&As[arow + kk][kHalf + 4 * ty]);
        const float4 b0 = *reinterpret_cast<const float4*>(&Bs[kk][4 * tx]);
        const float4 b1 = *reinterpret_cast<const float4*>(&Bs[kk][kHalf + 4 * tx]);
        const float a[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[kTN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int r = 0; r < kTM; ++r)
#pragma unroll
          for (int s = 0; s < kTN; ++s) acc[r][s] = fmaf(a[r], b[s], acc[r][s]);
      }
    }
    // increasing code index (s, then tiles): strict '<' keeps the lowest index among equal distances
#pragma unroll
    for (int s = 0; s < kTN; ++s) {
      const int j = local_index(tx, s);
      const float cn = c2s[j];
#pragma unroll
      for (int r = 0; r < kTM; ++r) {
        const float dist = fmaf(-2.f, acc[r][s], cn);
        if (dist < best[r]) {
          best[r] = dist;
          bidx[r] = k0 + j;
        }
      }
    }
  }

  // min over the 16 tx lanes of each half warp (lane = 16 * (ty % 2) + tx), then one atomic per vector
#pragma unroll
  for (int r = 0; r < kTM; ++r) {
    unsigned long long key = best[r] < CUDART_INF_F ? pack_key(best[r], bidx[r]) : kEmptyKey;
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, off);
      key = other < key ? other : key;
    }
    const int64_t row = n0 + local_index(ty, r);
    if (tx == 0 && row < N && key != kEmptyKey) atomicMin(keys + row, key);
  }
}

// codes[i, l] = decoded key; res[i] -= C[code]. One thread per residual element (grid-stride).
__global__ void finalize_kernel(float* __restrict__ res, const float* __restrict__ C,
                                const unsigned long long* __restrict__ keys, int64_t* __restrict__ codes,
                                int64_t N, int d, int L, int l) {
  const int64_t total = N * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / d;
    const int k = static_cast<int>(e - i * d);
    const unsigned long long key = keys[i];
    const int code = key == kEmptyKey ? 0 : static_cast<int>(static_cast<unsigned int>(key & 0xffffffffull));
    res[e] -= C[static_cast<int64_t>(code) * d + k];
    if (k == 0) codes[i * L + l] = code;
  }
}

// c2[j] = ||cb[j]||^2 for the LK codes of all depths, summed sequentially over d with fmaf.
__global__ void code_norms_kernel(const float* __restrict__ cb, float* __restrict__ c2, int64_t LK, int d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < LK; j += stride) {
    const float* c = cb + j * d;
    float s = 0.f;
    for (int k = 0; k < d; ++k) s = fmaf(c[k], c[k], s);
    c2[j] = s;
  }
}

unsigned grid_1d(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

template <int D>
cudaError_t launch(float* res, const float* cb, int64_t* codes, int64_t N, int K, int d, int L, float* c2,
                   unsigned long long* keys, cudaStream_t stream) {
  const int64_t grid_x = (N + kBN - 1) / kBN;
  if (grid_x > INT_MAX) return cudaErrorInvalidValue;
  const int tiles = (K + kBK - 1) / kBK;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) {
    sms = 132;
  }
  // slices of whole tiles: enough blocks to fill the GPU, never more slices than tiles or 65535
  int64_t slices = (static_cast<int64_t>(sms) * kBlocksPerSM + grid_x - 1) / grid_x;
  if (slices > tiles) slices = tiles;
  if (slices > 65535) slices = 65535;
  if (slices < 1) slices = 1;
  const int tiles_per_slice = static_cast<int>((tiles + slices - 1) / slices);
  slices = (tiles + tiles_per_slice - 1) / tiles_per_slice;  // no empty slice
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(slices));

  const int64_t LK = static_cast<int64_t>(L) * K;
  code_norms_kernel<<<grid_1d(LK, 256), 256, 0, stream>>>(cb, c2, LK, d);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned fin_grid = grid_1d(N * d, 256);
  for (int l = 0; l < L; ++l) {
    const float* C = cb + static_cast<int64_t>(l) * K * d;
    err = cudaMemsetAsync(keys, 0xff, static_cast<size_t>(N) * sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return err;
    const float* c2_l = c2 + static_cast<int64_t>(l) * K;
    argmin_kernel<D><<<grid, kThreads, 0, stream>>>(res, C, c2_l, keys, N, K, d, tiles_per_slice);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    finalize_kernel<<<fin_grid, 256, 0, stream>>>(res, C, keys, codes, N, d, L, l);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

// res: N x d float32 (in: x, out: residual); cb: L x K x d float32; codes: N x L int64 (every entry
// written); c2: L * K floats of scratch; keys: N uint64 of scratch. All device pointers, contiguous,
// with at least 4-byte (c2, res, cb) and 8-byte (codes, keys) alignment. Requires 1 <= d <= 8191 and
// 1 <= K <= INT_MAX - 128; N == 0 or L == 0 returns at once. Asynchronous on `stream`.
cudaError_t evotok_rvq_cuda_launch(float* res, const float* cb, int64_t* codes, int64_t N, int K, int d,
                                   int L, float* c2, unsigned long long* keys, cudaStream_t stream) {
  if (N == 0 || L == 0) return cudaSuccess;
  if (N < 0 || L < 0 || K < 1 || K > INT_MAX - kBK || d < 1 || d > 8191) return cudaErrorInvalidValue;
  switch (d) {
    case 8: return launch<8>(res, cb, codes, N, K, d, L, c2, keys, stream);
    case 16: return launch<16>(res, cb, codes, N, K, d, L, c2, keys, stream);
    case 32: return launch<32>(res, cb, codes, N, K, d, L, c2, keys, stream);
    case 64: return launch<64>(res, cb, codes, N, K, d, L, c2, keys, stream);
    default: return launch<0>(res, cb, codes, N, K, d, L, c2, keys, stream);
  }
}

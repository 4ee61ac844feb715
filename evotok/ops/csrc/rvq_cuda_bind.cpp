// Torch binding of the CUDA residual-VQ kernel (evotok/ops/csrc/rvq_cuda.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <vector>

cudaError_t evotok_rvq_cuda_launch(float* res, const float* cb, int64_t* codes, int64_t N, int K, int d,
                                   int L, float* c2, unsigned long long* keys, cudaStream_t stream);

std::vector<torch::Tensor> rvq_assign_cuda(torch::Tensor x_Nd, torch::Tensor codebooks_LKd) {
  TORCH_CHECK(x_Nd.is_cuda() && codebooks_LKd.is_cuda(), "rvq_assign_cuda: CUDA tensors only");
  TORCH_CHECK(x_Nd.dim() == 2 && codebooks_LKd.dim() == 3, "rvq_assign_cuda: bad ranks");
  TORCH_CHECK(x_Nd.scalar_type() == at::kFloat && codebooks_LKd.scalar_type() == at::kFloat,
              "rvq_assign_cuda: float32 only");
  TORCH_CHECK(x_Nd.is_contiguous() && codebooks_LKd.is_contiguous(), "rvq_assign_cuda: contiguous only");
  TORCH_CHECK(x_Nd.device() == codebooks_LKd.device(), "rvq_assign_cuda: tensors on different devices");
  const c10::cuda::CUDAGuard guard(x_Nd.device());
  const int64_t N = x_Nd.size(0), d = x_Nd.size(1);
  const int64_t L = codebooks_LKd.size(0), K = codebooks_LKd.size(1);
  TORCH_CHECK(codebooks_LKd.size(2) == d, "rvq_assign_cuda: d mismatch");
  // headroom of one code tile (128) so tile-local code indices never overflow int32 in the kernel
  TORCH_CHECK(K >= 1 && K <= std::numeric_limits<int32_t>::max() - 128, "rvq_assign_cuda: bad K");
  TORCH_CHECK(d >= 1 && d <= 8191, "rvq_assign_cuda: d must be in [1, 8191]");
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max(), "rvq_assign_cuda: bad L");
  auto residual = x_Nd.clone();
  auto codes = torch::zeros({N, L}, x_Nd.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {codes, residual};
  // scratch: ||c||^2 of every code of every depth, and one packed (distance, code) key per vector
  auto c2 = torch::empty({L * K}, x_Nd.options());
  auto keys = torch::empty({N}, x_Nd.options().dtype(at::kLong));
  const cudaError_t err = evotok_rvq_cuda_launch(
      residual.data_ptr<float>(), codebooks_LKd.data_ptr<float>(), codes.data_ptr<int64_t>(), N,
      static_cast<int>(K), static_cast<int>(d), static_cast<int>(L), c2.data_ptr<float>(),
      reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rvq_assign_cuda: launch failed: ", cudaGetErrorString(err));
  return {codes, residual};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rvq_assign_cuda", &rvq_assign_cuda, "residual-VQ assignment (CUDA), all depths in one call");
}

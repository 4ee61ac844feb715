// The generation sampler's CPU steps (depth_step_cpu.cpp, lm_step_cpu.cpp), bound into the CPU extension by
// rvq_cpu.cpp.
#pragma once
#include <torch/extension.h>

#include <vector>

torch::Tensor depth_step_cpu(torch::Tensor x, std::vector<torch::Tensor> kv, int64_t k,
                             std::vector<torch::Tensor> weights, torch::Tensor ln_f_w, torch::Tensor ln_f_b,
                             torch::Tensor head_w, torch::Tensor head_b, int64_t heads, double eps);

torch::Tensor lm_step_cpu(torch::Tensor x, std::vector<torch::Tensor> kv, int64_t t, torch::Tensor key_mask,
                          torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> weights,
                          std::vector<double> eps, torch::Tensor final_w, int64_t heads, int64_t kv_heads);

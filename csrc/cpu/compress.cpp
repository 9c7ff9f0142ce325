// CPU kernels of the fused ops compress (uniform capacity, dense output) and compress_ragged
// (head-wise capacities, ragged output): scores, budgets and selection in one call.
#include <ATen/core/Tensor.h>

#include "cpu/kernels.h"
#include "mixkv/compose.h"

namespace mixkv::cpu {
namespace {

struct CpuOps {  // the CPU kernels, called directly (no dispatcher round trip)
  static constexpr auto window_importance = &cpu::window_importance;
  static constexpr auto value_norm = &cpu::value_norm;
  static constexpr auto key_diversity = &cpu::key_diversity;
  static constexpr auto mix_scores = &cpu::mix_scores;
  static constexpr auto head_budgets = &cpu::head_budgets;
  static constexpr auto select_kv = &cpu::select_kv;
  static constexpr auto select_kv_ragged = &cpu::select_kv_ragged;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress(
    const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
    const OptTensor& key_mask, int64_t budget, int64_t window, c10::string_view mode,
    const OptTensor& redundancy, int64_t pool_kernel, c10::string_view pooling,
    c10::string_view gqa_reduce, std::optional<double> scaling) {
  return compress_with<CpuOps>(q_window, keys, values, key_mask, budget, window, mode,
                               redundancy, pool_kernel, pooling, gqa_reduce, scaling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_ragged(
    const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
    const OptTensor& key_mask, int64_t budget, int64_t window, c10::string_view mode,
    const OptTensor& redundancy, int64_t pool_kernel, c10::string_view pooling,
    c10::string_view gqa_reduce, std::optional<double> scaling, c10::string_view policy,
    double floor_alpha, bool normalize, int64_t layer, int64_t num_layers, int64_t pyramid_beta,
    const OptTensor& profile) {
  return compress_ragged_with<CpuOps>(q_window, keys, values, key_mask, budget, window, mode,
                                      redundancy, pool_kernel, pooling, gqa_reduce, scaling,
                                      policy, floor_alpha, normalize, layer, num_layers,
                                      pyramid_beta, profile);
}

}  // namespace mixkv::cpu

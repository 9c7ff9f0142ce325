// CPU implementations of the mixkv ops (one file per op family: scores.cpp, budgets.cpp,
// select.cpp, attention.cpp; all registered in register.cpp). CpuOps gives them to the fused
// compress flow (mixkv/compose.h), called directly, without a dispatcher round trip.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/string_view.h>

#include "mixkv/checks.h"
#include "mixkv/shapes.h"

namespace mixkv::cpu {

// Which tokens are real: a view of key_mask as bool [B, N]; every token is real without a mask.
class RealTokens {
 public:
  explicit RealTokens(const OptTensor& key_mask);
  bool operator()(int64_t b, int64_t j) const { return data_ == nullptr || data_[b * stride_ + j]; }
  bool all_real() const { return data_ == nullptr; }

 private:
  at::Tensor storage_;
  const bool* data_ = nullptr;
  int64_t stride_ = 0;
};

at::Tensor window_importance(const at::Tensor& q_window, const at::Tensor& keys,
                             const OptTensor& key_mask, int64_t pool_kernel,
                             c10::string_view pooling, c10::string_view gqa_reduce,
                             std::optional<double> scaling);

at::Tensor value_norm(const at::Tensor& values, int64_t window, const OptTensor& key_mask);

std::tuple<at::Tensor, at::Tensor> key_diversity(const at::Tensor& keys, int64_t window,
                                                 const OptTensor& key_mask);

at::Tensor mix_scores(const at::Tensor& importance, const OptTensor& value_norm,
                      const OptTensor& diversity, const OptTensor& redundancy,
                      c10::string_view mode, const OptTensor& key_mask);

at::Tensor head_budgets(const at::Tensor& importance, int64_t capacity, c10::string_view policy,
                        double floor_alpha, bool normalize, const OptTensor& key_mask,
                        int64_t layer, int64_t num_layers, int64_t pyramid_beta,
                        const OptTensor& profile);

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_kv(const at::Tensor& scores,
                                                         const at::Tensor& keys,
                                                         const at::Tensor& values,
                                                         int64_t capacity, int64_t window,
                                                         const OptTensor& key_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_kv_ragged(
    const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& capacity, int64_t window, const OptTensor& key_mask);

at::Tensor ragged_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& starts,
                            const at::Tensor& lengths, const OptTensor& valid,
                            std::optional<double> scaling);

struct CpuOps {
  struct DeviceGuard {
    explicit DeviceGuard(c10::Device) {}
  };
  static constexpr auto window_importance = &cpu::window_importance;
  static constexpr auto value_norm = &cpu::value_norm;
  static constexpr auto key_diversity = &cpu::key_diversity;
  static constexpr auto mix_scores = &cpu::mix_scores;
  static constexpr auto head_budgets = &cpu::head_budgets;
  static constexpr auto select_kv = &cpu::select_kv;
  static constexpr auto select_kv_ragged = &cpu::select_kv_ragged;
};

}  // namespace mixkv::cpu

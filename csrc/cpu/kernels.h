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

#include "mixkv/kernels.inc"  // window_importance ... ragged_attention

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

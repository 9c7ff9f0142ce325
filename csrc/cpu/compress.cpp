// The CPU fused ops compress (uniform capacity, dense output) and compress_ragged (head-wise
// capacities, ragged output): the shared flow of mixkv/compose.h over the CPU kernels.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "mixkv/compose.h"

namespace mixkv::cpu {
namespace {

struct CpuOps {  // the CPU kernels, called directly (no dispatcher round trip)
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

}  // namespace
}  // namespace mixkv::cpu

TORCH_LIBRARY_IMPL(mixkv, CPU, m) {
  m.impl("compress", &mixkv::compress_with<mixkv::cpu::CpuOps>);
  m.impl("compress_ragged", &mixkv::compress_ragged_with<mixkv::cpu::CpuOps>);
}

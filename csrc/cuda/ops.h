// CUDA implementations of the mixkv ops (one glue file per op family: scores.cpp, budgets.cpp,
// select.cpp, attention.cpp; all registered in register.cpp). Same signatures as the CPU ones
// (cpu/kernels.h); CudaOps gives them to the fused compress flow (mixkv/compose.h), called
// directly, without a dispatcher round trip.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/string_view.h>

#include "mixkv/shapes.h"

namespace mixkv::cuda {

#include "mixkv/kernels.inc"  // window_importance ... ragged_attention

struct CudaOps {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr auto window_importance = &cuda::window_importance;
  static constexpr auto value_norm = &cuda::value_norm;
  static constexpr auto key_diversity = &cuda::key_diversity;
  static constexpr auto mix_scores = &cuda::mix_scores;
  static constexpr auto head_budgets = &cuda::head_budgets;
  static constexpr auto select_kv = &cuda::select_kv;
  static constexpr auto select_kv_ragged = &cuda::select_kv_ragged;
};

}  // namespace mixkv::cuda

// The fused ops compress / compress_ragged, written once for every backend: steps 1-5 of the
// algorithm (importance, the statistics the mode needs, the mix), then budgets and selection.
// `Ops` names the backend's kernels as static members with the op signatures: window_importance,
// value_norm, key_diversity, mix_scores, head_budgets, select_kv, select_kv_ragged; and its
// DeviceGuard type. Backends register compress_with<Ops> / compress_ragged_with<Ops> directly.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "mixkv/checks.h"
#include "mixkv/options.h"
#include "mixkv/shapes.h"

namespace mixkv {

struct Scored {
  at::Tensor importance;  // A, [B, Hkv, C]
  at::Tensor score;       // S, [B, Hkv, C]
};

template <class Ops>
Scored score_candidates(const at::Tensor& q_window, const at::Tensor& keys,
                        const at::Tensor& values, const OptTensor& key_mask, int64_t window,
                        c10::string_view mode_name, const OptTensor& redundancy,
                        int64_t pool_kernel, c10::string_view pooling,
                        c10::string_view gqa_reduce, std::optional<double> scaling) {
  const Mode mode = parse_mode("compress", mode_name);
  Scored out;
  out.importance = Ops::window_importance(q_window, keys, key_mask, pool_kernel, pooling,
                                          gqa_reduce, scaling);
  OptTensor vnorm, diversity, red = redundancy;
  if (mode_uses_value_norm(mode)) vnorm = Ops::value_norm(values, window, key_mask);
  if (mode_uses_diversity(mode)) {
    auto [d, online] = Ops::key_diversity(keys, window, key_mask);
    diversity = d;
    if (!red) red = online;  // online redundancy unless a profile is given
  }
  out.score = Ops::mix_scores(out.importance, vnorm, diversity, red, mode_name, key_mask);
  return out;
}

template <class Ops>
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_with(
    const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
    const OptTensor& key_mask, int64_t budget, int64_t window, c10::string_view mode,
    const OptTensor& redundancy, int64_t pool_kernel, c10::string_view pooling,
    c10::string_view gqa_reduce, std::optional<double> scaling) {
  compress_shape(q_window, keys, values, key_mask, budget, window, mode, redundancy, pool_kernel,
                 pooling, gqa_reduce);
  const typename Ops::DeviceGuard guard(keys.device());
  const Scored s = score_candidates<Ops>(q_window, keys, values, key_mask, window, mode,
                                         redundancy, pool_kernel, pooling, gqa_reduce, scaling);
  return Ops::select_kv(s.score, keys, values, budget - window, window, key_mask);
}

template <class Ops>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_ragged_with(
    const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
    const OptTensor& key_mask, int64_t budget, int64_t window, c10::string_view mode,
    const OptTensor& redundancy, int64_t pool_kernel, c10::string_view pooling,
    c10::string_view gqa_reduce, std::optional<double> scaling, c10::string_view policy,
    double floor_alpha, bool normalize, int64_t layer, int64_t num_layers, int64_t pyramid_beta,
    const OptTensor& profile) {
  compress_check("compress_ragged", q_window, keys, values, key_mask, budget, window, mode,
                 redundancy, pool_kernel, pooling, gqa_reduce);
  const typename Ops::DeviceGuard guard(keys.device());
  const Scored s = score_candidates<Ops>(q_window, keys, values, key_mask, window, mode,
                                         redundancy, pool_kernel, pooling, gqa_reduce, scaling);
  const at::Tensor capacity =
      Ops::head_budgets(s.importance, budget - window, policy, floor_alpha, normalize, key_mask,
                        layer, num_layers, pyramid_beta, profile);
  return Ops::select_kv_ragged(s.score, keys, values, capacity, window, key_mask);
}

}  // namespace mixkv

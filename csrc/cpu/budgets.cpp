// CPU kernel of head_budgets: per-head capacities for uniform, pyramid, adaptive and explicit
// policies. Rounding is integer-exact: each row sums to Hkv * min(c_layer, real candidates).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/kernels.h"
#include "mixkv/options.h"

namespace mixkv::cpu {
namespace {

// Integers near `targets` summing to `total`, each <= cap: water-filling (heads whose share
// exceeds cap are fixed at cap and the rest re-split), then largest remainder, ties to the
// lower head. The arithmetic mirrors mixkv.reference._allocate step for step.
std::vector<int64_t> allocate(const std::vector<double>& targets, int64_t total, int64_t cap) {
  const int64_t H = static_cast<int64_t>(targets.size());
  if (total >= H * cap) return std::vector<int64_t>(H, cap);
  std::vector<bool> fixed(H, false);
  std::vector<double> shares(targets);
  while (true) {
    int64_t n_free = 0;
    double weight = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      if (fixed[h]) continue;
      ++n_free;
      weight += targets[h];
    }
    const int64_t remaining = total - cap * (H - n_free);
    bool any_over = false;
    for (int64_t h = 0; h < H; ++h) {
      if (fixed[h]) continue;
      shares[h] = weight > 0 ? static_cast<double>(remaining) * targets[h] / weight
                             : static_cast<double>(remaining) / static_cast<double>(n_free);
    }
    for (int64_t h = 0; h < H; ++h) {
      if (!fixed[h] && shares[h] > static_cast<double>(cap)) {
        fixed[h] = true;
        shares[h] = static_cast<double>(cap);
        any_over = true;
      }
    }
    if (!any_over) break;
  }
  std::vector<int64_t> counts(H);
  int64_t leftover = total;
  for (int64_t h = 0; h < H; ++h) {
    counts[h] = std::min<int64_t>(cap, static_cast<int64_t>(std::floor(shares[h])));
    leftover -= counts[h];
  }
  std::vector<int64_t> order(H);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return shares[a] - std::floor(shares[a]) > shares[b] - std::floor(shares[b]);
  });
  while (leftover > 0) {
    for (int64_t h : order) {
      if (leftover > 0 && counts[h] < cap) {
        ++counts[h];
        --leftover;
      }
    }
  }
  return counts;
}

// PyramidKV: layer capacities linear from hi (layer 0) to lo (last layer), lo = c / beta,
// hi = 2c - lo (so the mean is c), hi clamped to the candidates with lo raised to match;
// layer l gets floor(S(l + 1)) - floor(S(l)) of the running sum S, so the total is L * c.
int64_t pyramid_capacity(int64_t capacity, int64_t candidates, int64_t layer, int64_t num_layers,
                         int64_t beta) {
  if (capacity >= candidates) return candidates;
  if (num_layers == 1) return capacity;
  int64_t lo = capacity / beta, hi = 2 * capacity - lo;
  if (hi > candidates) {
    hi = candidates;
    lo = 2 * capacity - candidates;
  }
  const int64_t den = 2 * (num_layers - 1);
  auto cumulative = [&](int64_t l) { return (den * l * hi - (hi - lo) * l * (l - 1)) / den; };
  return cumulative(layer + 1) - cumulative(layer);
}

// AdaKV: each head's count in the layer's global top-(Hkv * k), optionally after weighting each
// head by the share of its mass held in its own top-k; ties go to the lower (head, position).
std::vector<double> adaptive_targets(const float* A, int64_t Hkv, int64_t C,
                                     const std::vector<int64_t>& real_idx, int64_t k,
                                     double floor_alpha, bool normalize) {
  const int64_t r = static_cast<int64_t>(real_idx.size());
  std::vector<double> flat(Hkv * r);
  std::vector<double> head(r);
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t t = 0; t < r; ++t) head[t] = A[h * C + real_idx[t]];
    double factor = 1.0;
    if (normalize && k > 0) {
      std::vector<double> sorted(head);
      std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<>());
      const double top = std::accumulate(sorted.begin(), sorted.begin() + k, 0.0);
      const double mass = std::accumulate(head.begin(), head.end(), 0.0);
      factor = mass > 0 ? top / mass : 0.0;
    }
    for (int64_t t = 0; t < r; ++t) flat[h * r + t] = head[t] * factor;
  }
  std::vector<int64_t> order(Hkv * r);
  std::iota(order.begin(), order.end(), 0);
  const int64_t chosen = Hkv * k;
  if (chosen < Hkv * r) {
    std::nth_element(order.begin(), order.begin() + chosen, order.end(), [&](int64_t a, int64_t b) {
      return flat[a] != flat[b] ? flat[a] > flat[b] : a < b;
    });
  }
  std::vector<int64_t> n(Hkv, 0);
  for (int64_t i = 0; i < chosen; ++i) ++n[order[i] / r];
  std::vector<double> targets(Hkv);
  for (int64_t h = 0; h < Hkv; ++h) {
    targets[h] = floor_alpha * static_cast<double>(k) + (1.0 - floor_alpha) * static_cast<double>(n[h]);
  }
  return targets;
}

}  // namespace

at::Tensor head_budgets(const at::Tensor& importance, int64_t capacity, c10::string_view policy_name,
                        double floor_alpha, bool normalize, const OptTensor& key_mask,
                        int64_t layer, int64_t num_layers, int64_t pyramid_beta,
                        const OptTensor& profile) {
  head_budgets_shape(importance, capacity, policy_name, floor_alpha, key_mask, layer, num_layers,
                     pyramid_beta, profile);
  const Policy policy = parse_policy("head_budgets", policy_name);
  const int64_t B = importance.size(0), Hkv = importance.size(1), C = importance.size(2);
  const RealTokens real(key_mask);
  const at::Tensor A = importance.to(at::kFloat).contiguous();
  std::vector<double> weights;
  if (policy == Policy::Explicit) {
    const at::Tensor row = profile->select(0, layer).to(at::kDouble).cpu().contiguous();
    weights.assign(row.const_data_ptr<double>(), row.const_data_ptr<double>() + Hkv);
    for (double w : weights) {
      MIXKV_CHECK_VALUE(std::isfinite(w) && w >= 0.0, "head_budgets",
                        "profile must hold finite weights >= 0, got ", w, " in layer ", layer);
    }
    if (std::accumulate(weights.begin(), weights.end(), 0.0) <= 0.0) weights.assign(Hkv, 1.0);
  }
  at::Tensor out = at::empty({B, Hkv}, importance.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::vector<int64_t> real_idx;
      for (int64_t j = 0; j < C; ++j) {
        if (real(b, j)) real_idx.push_back(j);
      }
      const int64_t r = static_cast<int64_t>(real_idx.size());
      const int64_t k = std::min(capacity, r);
      std::vector<int64_t> caps;
      switch (policy) {
        case Policy::Uniform: caps.assign(Hkv, k); break;
        case Policy::Pyramid:
          caps.assign(Hkv, pyramid_capacity(capacity, r, layer, num_layers, pyramid_beta));
          break;
        case Policy::Explicit: caps = allocate(weights, Hkv * k, r); break;
        case Policy::Adaptive:
          caps = allocate(adaptive_targets(A.const_data_ptr<float>() + b * Hkv * C, Hkv, C, real_idx,
                                           k, floor_alpha, normalize),
                          Hkv * k, r);
          break;
      }
      for (int64_t h = 0; h < Hkv; ++h) o[b * Hkv + h] = static_cast<int32_t>(caps[h]);
    }
  });
  return out;
}

}  // namespace mixkv::cpu

// CPU kernels of select_kv (uniform capacity, dense output) and select_kv_ragged (per-head
// capacities, segments in (row, head) order). Per head: the k best candidates (real before
// padded, higher score, then lower position), in ascending position order, then the window.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/kernels.h"

namespace mixkv::cpu {
namespace {

// Writes the kept positions of one head (k selected candidates + the W window positions) to
// `kept`; returns false if a real candidate has a non-finite score.
bool select_head(const float* scores, int64_t C, int64_t W, int64_t k, const RealTokens& real,
                 int64_t b, std::vector<int32_t>& order, int32_t* kept) {
  bool finite = true;
  for (int64_t j = 0; j < C; ++j) finite &= !real(b, j) || std::isfinite(scores[j]);
  if (k < C) {
    order.resize(C);
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + k, order.end(), [&](int32_t x, int32_t y) {
      const bool rx = real(b, x), ry = real(b, y);
      if (rx != ry) return rx;
      if (rx && scores[x] != scores[y]) return scores[x] > scores[y];
      return x < y;
    });
    std::sort(order.begin(), order.begin() + k);
    std::copy(order.begin(), order.begin() + k, kept);
  } else {
    std::iota(kept, kept + C, 0);
  }
  std::iota(kept + std::min(k, C), kept + std::min(k, C) + W, static_cast<int32_t>(C));
  return finite;
}

// Selects one head's tokens and copies their K/V rows from the [B, Hkv, N, D] inputs.
struct HeadGather {
  const float* scores;  // [B * Hkv, C]
  const char* keys;     // [B * Hkv, N, row_bytes]
  const char* values;
  char* out_keys;  // kept rows, at `dst_row` for head bh
  char* out_values;
  int64_t Hkv, N, C, W, row_bytes;
  const RealTokens& real;
  std::atomic<bool>& all_finite;

  void operator()(int64_t bh, int64_t k, int32_t* kept, int64_t dst_row,
                  std::vector<int32_t>& order) const {
    if (!select_head(scores + bh * C, C, W, k, real, bh / Hkv, order, kept)) all_finite = false;
    const int64_t src = bh * N * row_bytes, dst = dst_row * row_bytes;
    for (int64_t t = 0; t < std::min(k, C) + W; ++t) {
      std::memcpy(out_keys + dst + t * row_bytes, keys + src + kept[t] * row_bytes, row_bytes);
      std::memcpy(out_values + dst + t * row_bytes, values + src + kept[t] * row_bytes, row_bytes);
    }
  }
};

HeadGather make_gather(const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
                       at::Tensor& out_keys, at::Tensor& out_values, int64_t window,
                       const RealTokens& real, std::atomic<bool>& all_finite) {
  return HeadGather{scores.const_data_ptr<float>(),
                    static_cast<const char*>(keys.const_data_ptr()),
                    static_cast<const char*>(values.const_data_ptr()),
                    static_cast<char*>(out_keys.data_ptr()),
                    static_cast<char*>(out_values.data_ptr()),
                    keys.size(1), keys.size(2), keys.size(2) - window, window,
                    keys.size(3) * keys.element_size(), real, all_finite};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_kv(const at::Tensor& scores,
                                                         const at::Tensor& keys,
                                                         const at::Tensor& values,
                                                         int64_t capacity, int64_t window,
                                                         const OptTensor& key_mask) {
  select_kv_shape(scores, keys, values, capacity, window, key_mask);
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  const int64_t C = N - window, k = std::min(capacity, C), L = k + window;
  const RealTokens real(key_mask);
  const at::Tensor s = scores.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  at::Tensor out_k = at::empty({B, Hkv, L, D}, keys.options());
  at::Tensor out_v = at::empty({B, Hkv, L, D}, values.options());
  at::Tensor idx = at::empty({B, Hkv, L}, keys.options().dtype(at::kInt));
  std::atomic<bool> all_finite{true};
  const HeadGather gather = make_gather(s, kc, vc, out_k, out_v, window, real, all_finite);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order;
    for (int64_t bh = begin; bh < end; ++bh) {
      gather(bh, k, idx.data_ptr<int32_t>() + bh * L, bh * L, order);
    }
  });
  check_scores_finite("select_kv", all_finite);
  return {out_k, out_v, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_kv_ragged(
    const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& capacity, int64_t window, const OptTensor& key_mask) {
  const char* op = "select_kv_ragged";
  select_kv_ragged_check(scores, keys, values, capacity, window, key_mask);
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  const int64_t C = N - window;
  const RealTokens real(key_mask);
  const at::Tensor caps = capacity.contiguous();
  at::Tensor offsets = at::empty({B * Hkv + 1}, capacity.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  int64_t total = 0;
  off[0] = 0;
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int32_t c = caps.const_data_ptr<int32_t>()[bh];
    check_head_capacity(op, c, bh, Hkv);
    total += std::min<int64_t>(c, C) + window;
    check_offsets_fit(op, total);
    off[bh + 1] = static_cast<int32_t>(total);
  }
  const at::Tensor s = scores.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  at::Tensor out_k = at::empty({total, D}, keys.options());
  at::Tensor out_v = at::empty({total, D}, values.options());
  at::Tensor idx = at::empty({total}, keys.options().dtype(at::kInt));
  std::atomic<bool> all_finite{true};
  const HeadGather gather = make_gather(s, kc, vc, out_k, out_v, window, real, all_finite);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order;
    for (int64_t bh = begin; bh < end; ++bh) {
      gather(bh, off[bh + 1] - off[bh] - window, idx.data_ptr<int32_t>() + off[bh], off[bh], order);
    }
  });
  check_scores_finite(op, all_finite);
  return {out_k, out_v, idx, offsets};
}

}  // namespace mixkv::cpu

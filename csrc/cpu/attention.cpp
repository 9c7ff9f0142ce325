// CPU kernel of ragged_attention: the q newest tokens of each (batch row, KV head) segment of a
// flat K/V buffer attend to their segment. Work items are (segment, token chunk) and cover all
// G * q query rows of the KV head, so each K/V row is read and converted once per item; chunks
// of long segments run in parallel (split-K) and keep a float32 online-softmax state that a
// second pass merges per query row.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/kernels.h"

namespace mixkv::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kTile = 64;       // K/V rows converted to float32 and scored together
constexpr int64_t kMinChunk = 512;  // fewer tokens than this are not worth a split
constexpr int64_t kMaxPartialFloats = int64_t{1} << 24;  // split state of all items, about

// Every segment must lie inside the buffer and end with its q query tokens.
void check_segments(const int32_t* starts, const int32_t* lengths, int64_t Hkv, int64_t segments,
                    int64_t q, int64_t S) {
  const char* op = "ragged_attention";
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t b = s / Hkv, h = s % Hkv, start = starts[s], len = lengths[s];
    MIXKV_CHECK_VALUE(start >= 0, op, "starts must be >= 0, got ", start, " at [", b, ", ", h,
                      "]");
    MIXKV_CHECK_VALUE(len >= q, op, "lengths must be >= q = ", q,
                      " (a segment ends with its query tokens), got ", len, " at [", b, ", ", h,
                      "]");
    MIXKV_CHECK_VALUE(start + len <= S, op, "segment [", b, ", ", h, "] (starts + lengths = ",
                      start, " + ", len, ") exceeds the S = ", S, " rows of keys");
  }
}

template <typename T>
struct Problem {
  const T* query;  // [B, Hq, q, D]: a KV head's G*q query rows are contiguous, row r = g*q + i
  const T* keys;   // [S, D]
  const T* values;
  const int32_t* starts;  // [B * Hkv]
  const int32_t* lengths;
  const bool* valid;  // [S] or nullptr
  int64_t G, q, D;
  float scale;
  int64_t rows() const { return G * q; }
};

// Tokens [begin, end) of one segment.
struct Item {
  int64_t segment, begin, end;
};

// Per-thread buffers.
struct Scratch {
  std::vector<float> query, keys, values, logits, weights;
  std::vector<int64_t> used;  // tokens of the tile with a weight
  Scratch(int64_t rows, int64_t D)
      : query(rows * D), keys(kTile * D), values(kTile * D), logits(kTile), weights(kTile),
        used(kTile) {}
};

// n rows of D as float32: the input itself when it is float32, else converted into `buffer`.
template <typename T>
const float* as_float(const T* x, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<float>(x[j]);
    return buffer.data();
  }
}

// out[j] = q . k_j for n rows k_j of D, four rows at a time: independent sums run in
// parallel where a single running sum waits on each add.
void dot_rows(const float* q, const float* k, int64_t n, int64_t D, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *k0 = k + j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k1[d];
      s2 += q[d] * k2[d];
      s3 += q[d] * k3[d];
    }
    out[j] = s0, out[j + 1] = s1, out[j + 2] = s2, out[j + 3] = s3;
  }
  for (; j < n; ++j) {
    float s0 = 0.f;
    for (int64_t d = 0; d < D; ++d) s0 += q[d] * k[j * D + d];
    out[j] = s0;
  }
}

// acc += w[u] * v_{rows[u]} for u < n, four rows per pass over acc.
void add_weighted_rows(const float* w, const int64_t* rows, int64_t n, const float* v, int64_t D,
                       float* acc) {
  int64_t u = 0;
  for (; u + 4 <= n; u += 4) {
    const float *v0 = v + rows[u] * D, *v1 = v + rows[u + 1] * D, *v2 = v + rows[u + 2] * D,
                *v3 = v + rows[u + 3] * D;
    const float w0 = w[u], w1 = w[u + 1], w2 = w[u + 2], w3 = w[u + 3];
    for (int64_t d = 0; d < D; ++d) acc[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
  }
  for (; u < n; ++u) {
    const float* vu = v + rows[u] * D;
    for (int64_t d = 0; d < D; ++d) acc[d] += w[u] * vu[d];
  }
}

// Online softmax of every query row of the item's segment over the item's tokens: m = max
// logit, l = sum of exp(logit - m), acc = sum of exp(logit - m) * value (m = -inf, l = 0 and
// acc = 0 when the row sees no valid token here).
template <typename T>
void attend(const Problem<T>& p, const Item& item, Scratch& scratch, float* m, float* l,
            float* acc) {
  const int64_t D = p.D, R = p.rows();
  const int64_t start = p.starts[item.segment], len = p.lengths[item.segment];
  const T* q = p.query + item.segment * R * D;  // segment b * Hkv + h
  for (int64_t j = 0; j < R * D; ++j) scratch.query[j] = static_cast<float>(q[j]) * p.scale;
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * D, 0.f);
  float* logits = scratch.logits.data();

  for (int64_t t0 = item.begin; t0 < item.end; t0 += kTile) {
    const int64_t n = std::min(kTile, item.end - t0);
    const float* k = as_float(p.keys + (start + t0) * D, n * D, scratch.keys);
    const float* v = as_float(p.values + (start + t0) * D, n * D, scratch.values);
    for (int64_t r = 0; r < R; ++r) {
      // Query i is token len - q + i of the segment: it sees tokens < len - q + i + 1.
      const int64_t visible = std::min(n, len - p.q + r % p.q + 1 - t0);
      if (visible <= 0) continue;
      dot_rows(scratch.query.data() + r * D, k, visible, D, logits);
      float tile_max = kNegInf;
      for (int64_t j = 0; j < visible; ++j) {
        if (p.valid != nullptr && !p.valid[start + t0 + j]) {
          logits[j] = kNegInf;  // padding: never attended, whatever its K/V hold
        } else {
          tile_max = std::max(tile_max, logits[j]);
        }
      }
      if (tile_max == kNegInf) continue;
      float* a = acc + r * D;
      const float m_new = std::max(m[r], tile_max);
      const float alpha = std::exp(m[r] - m_new);  // 0 while nothing was seen
      if (alpha != 1.f) {
        l[r] *= alpha;
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
      m[r] = m_new;
      int64_t n_used = 0;
      for (int64_t j = 0; j < visible; ++j) {
        if (logits[j] == kNegInf) continue;
        scratch.weights[n_used] = std::exp(logits[j] - m_new);
        l[r] += scratch.weights[n_used];
        scratch.used[n_used++] = j;
      }
      add_weighted_rows(scratch.weights.data(), scratch.used.data(), n_used, v, D, a);
    }
  }
}

}  // namespace

at::Tensor ragged_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& starts,
                            const at::Tensor& lengths, const OptTensor& valid,
                            std::optional<double> scaling) {
  ragged_attention_shape(query, keys, values, starts, lengths, valid);
  const int64_t B = query.size(0), Hq = query.size(1), q = query.size(2), D = query.size(3);
  const int64_t Hkv = starts.size(1), G = Hq / Hkv, segments = B * Hkv, R = G * q;
  const at::Tensor st = starts.contiguous(), len = lengths.contiguous();
  const int32_t* start_data = st.const_data_ptr<int32_t>();
  const int32_t* len_data = len.const_data_ptr<int32_t>();
  check_segments(start_data, len_data, Hkv, segments, q, keys.size(0));
  at::Tensor out = at::empty({B, q, Hq, D}, query.options());
  if (out.numel() == 0) return out;

  // Chunks sized for about 4 items per thread over all tokens (ragged segments balance), but
  // each item keeps R * D floats of state: long appends (large q) get fewer, longer chunks.
  int64_t total = 0;
  for (int64_t s = 0; s < segments; ++s) total += len_data[s];
  const int64_t wanted =
      std::clamp<int64_t>(kMaxPartialFloats / (R * D), 1, 4 * at::get_num_threads());
  const int64_t chunk = std::max(kMinChunk, (total + wanted - 1) / wanted);
  std::vector<Item> items;
  std::vector<int64_t> first_item(segments + 1);
  for (int64_t s = 0; s < segments; ++s) {
    first_item[s] = static_cast<int64_t>(items.size());
    for (int64_t t = 0; t < len_data[s]; t += chunk) {
      items.push_back({s, t, std::min<int64_t>(len_data[s], t + chunk)});
    }
  }
  first_item[segments] = static_cast<int64_t>(items.size());
  const int64_t n_items = first_item[segments];
  std::vector<float> m(n_items * R), l(n_items * R), acc(n_items * R * D);

  const at::Tensor qc = query.contiguous(), k = keys.contiguous(), v = values.contiguous();
  const at::Tensor mask = valid ? valid->contiguous() : at::Tensor();
  const float scale =
      static_cast<float>(scaling.value_or(1.0 / std::sqrt(static_cast<double>(D))));
  const auto dtype = qc.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ragged_attention", [&] {
    const Problem<scalar_t> p{qc.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(),
                              v.const_data_ptr<scalar_t>(),
                              start_data,
                              len_data,
                              mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                              G, q, D, scale};
    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(R, D);
      for (int64_t it = begin; it < end; ++it) {
        attend(p, items[it], scratch, &m[it * R], &l[it * R], &acc[it * R * D]);
      }
    });
    // Merge each query row's items and write out[b, i, h*G + g, :].
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, segments * R, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / R, r = task % R, b = s / Hkv, h = s % Hkv;
        float m_max = kNegInf;
        for (int64_t it = first_item[s]; it < first_item[s + 1]; ++it) {
          m_max = std::max(m_max, m[it * R + r]);
        }
        std::fill(row.begin(), row.end(), 0.f);
        float sum = 0.f;
        if (m_max != kNegInf) {  // else the row saw no valid token: zeros
          for (int64_t it = first_item[s]; it < first_item[s + 1]; ++it) {
            const float w = std::exp(m[it * R + r] - m_max);
            const float* a = &acc[(it * R + r) * D];
            sum += w * l[it * R + r];
            for (int64_t d = 0; d < D; ++d) row[d] += w * a[d];
          }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        scalar_t* dst = o + ((b * q + r % q) * Hq + h * G + r / q) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(row[d] * inv);
      }
    });
  });
  return out;
}

}  // namespace mixkv::cpu

// window_importance, key_diversity and mix_scores on CUDA (semantics: csrc/cpu/scores.cpp).
// Deterministic: every reduction runs in a fixed order (warp shuffles, then the warps' partial
// results combined in warp order by one thread); no floating-point atomics. Arithmetic is fp32
// (fp64 where the CPU op sums in fp64), IEEE division/sqrt and expf (no fast-math), and the
// few multiply-adds that the CPU does unfused are written with __fmul_rn/__fadd_rn so nvcc does
// not contract them into FMAs.
#include <cfloat>
#include <cstdint>

#include <math_constants.h>

#include "cuda/dtype.cuh"
#include "cuda/scores.cuh"

namespace mixkv::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Reductions.

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Min {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T x, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// x reduced over the block in a fixed order; every thread gets the result. Every thread of the
// block must call it (blockDim.x a multiple of 32, at most 1024).
template <typename T, typename Op>
__device__ T block_reduce(T x, Op op) {
  __shared__ T partial[32];
  __shared__ T result;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_reduce(x, op);
  __syncthreads();  // every thread has read the previous call's result
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = partial[0];
    for (int w = 1; w < warps; ++w) r = op(r, partial[w]);
    result = r;
  }
  __syncthreads();
  return result;
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Grid-stride loops never need more blocks than this.
constexpr int64_t kMaxBlocks = 1 << 20;

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---------------------------------------------------------------------------------------------
// window_importance.
//
// Workspace: row_max [BH * R], row_inv [BH * R] (R = G * W query rows per KV head), then the
// GQA-reduced window attention of each candidate before pooling, reduced [BH * C].

constexpr int kStatsThreads = 256;
constexpr int kAggregateThreads = 128;
constexpr int kPoolThreads = 256;

struct ImportanceWorkspace {
  float *row_max, *row_inv, *reduced;
  __host__ __device__ explicit ImportanceWorkspace(const WindowImportance& p) {
    const int64_t rows = p.B * p.Hkv * p.G * p.W;
    row_max = p.workspace;
    row_inv = row_max + rows;
    reduced = row_inv + rows;
  }
};

// Online softmax state (m = running max, s = sum of exp(x - m)); -inf entries add nothing.
__device__ __forceinline__ void softmax_add(float& m, float& s, float x) {
  if (x == -CUDART_INF_F) return;
  if (x > m) {
    s = s * expf(m - x) + 1.f;  // m = -inf: s is 0 and expf(-inf) = 0
    m = x;
  } else {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -CUDART_INF_F) return;
  if (m == -CUDART_INF_F) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// One block per query row (bh, r = g * W + i): max and softmax denominator of its scaled logits
// over the keys it sees (0 .. C + i, real ones only). Stores row_max and
// row_inv = 1 / (denominator * real window queries of the batch row), or 0 and 0 for a padded
// window query (it sees nothing and contributes nothing), as the CPU op does.
__global__ void __launch_bounds__(kStatsThreads) importance_row_stats(const WindowImportance p) {
  const ImportanceWorkspace ws(p);
  const int64_t R = p.G * p.W, row = blockIdx.x;
  const int64_t bh = row / R, i = (row % R) % p.W, b = bh / p.Hkv;
  const bool* mask = p.key_mask != nullptr ? p.key_mask + b * p.N : nullptr;

  long long queries = p.W;
  if (mask != nullptr) {
    long long count = 0;
    for (int64_t t = threadIdx.x; t < p.W; t += blockDim.x) count += mask[p.C + t] ? 1 : 0;
    queries = block_reduce(count, Sum{});
    if (!mask[p.C + i]) {  // uniform over the block
      if (threadIdx.x == 0) {
        ws.row_max[row] = 0.f;
        ws.row_inv[row] = 0.f;
      }
      return;
    }
  }

  const float* L = p.logits + row * p.N;
  const int64_t end = p.C + i + 1;  // window query i sits at position C + i
  float m = -CUDART_INF_F, s = 0.f;
  for (int64_t j = threadIdx.x; j < end; j += blockDim.x) {
    if (mask != nullptr && !mask[j]) continue;
    softmax_add(m, s, __fmul_rn(L[j], p.scale));
  }
  // Merge the threads' states: warps by shuffles, then the warps in order.
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    softmax_merge(m, s, m2, s2);
  }
  __shared__ float warp_m[kStatsThreads / 32], warp_s[kStatsThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = warp_m[0];
    s = warp_s[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) softmax_merge(m, s, warp_m[w], warp_s[w]);
    const float real_queries = static_cast<float>(queries > 1 ? queries : 1);
    ws.row_max[row] = m == -CUDART_INF_F ? 0.f : m;
    ws.row_inv[row] = s > 0.f ? 1.f / (s * real_queries) : 0.f;
  }
}

// One thread per candidate j of KV head bh: its softmax weight summed over the window queries
// of each query head of the group (the mean over the window is folded into row_inv), then the
// GQA reduce (mean or max over the G query heads). Padded candidates get 0 (as on the CPU,
// where their logits are -inf). Reads of the logits are coalesced over j.
template <bool kMaxReduce>
__global__ void __launch_bounds__(kAggregateThreads)
    importance_aggregate(const WindowImportance p, int64_t tiles) {
  const ImportanceWorkspace ws(p);
  const int64_t bh = blockIdx.x / tiles;
  const int64_t j = (blockIdx.x % tiles) * kAggregateThreads + threadIdx.x;
  if (j >= p.C) return;
  const int64_t b = bh / p.Hkv, R = p.G * p.W;
  float* reduced = ws.reduced + bh * p.C;
  if (p.key_mask != nullptr && !p.key_mask[b * p.N + j]) {
    reduced[j] = 0.f;
    return;
  }
  const float* row_max = ws.row_max + bh * R;
  const float* row_inv = ws.row_inv + bh * R;
  const float* L = p.logits + bh * R * p.N + j;
  float acc = 0.f;
  for (int64_t g = 0; g < p.G; ++g) {
    float sum = 0.f;
    for (int64_t i = 0; i < p.W; ++i) {
      const int64_t r = g * p.W + i;
      const float inv = row_inv[r];
      if (inv == 0.f) continue;  // a padded window query: its weights are all 0
      const float w = expf(__fmul_rn(L[r * p.N], p.scale) - row_max[r]);
      sum = __fadd_rn(sum, __fmul_rn(w, inv));
    }
    if (g == 0) {
      acc = sum;
    } else {
      acc = kMaxReduce ? fmaxf(acc, sum) : acc + sum;
    }
  }
  reduced[j] = kMaxReduce ? acc : acc / static_cast<float>(p.G);
}

// 1-D pooling over each head's candidates, stride 1, padding k / 2: "avg" divides by k with the
// zero padding counted (padded tokens hold 0 in `reduced`), "max" skips padding and padded
// tokens. Padded candidates get 0.
__global__ void __launch_bounds__(kPoolThreads) importance_pool(const WindowImportance p) {
  const ImportanceWorkspace ws(p);
  const int64_t total = p.B * p.Hkv * p.C, half = p.pool_kernel / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kPoolThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kPoolThreads + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t bh = idx / p.C, j = idx % p.C, b = bh / p.Hkv;
    const bool* mask = p.key_mask != nullptr ? p.key_mask + b * p.N : nullptr;
    if (mask != nullptr && !mask[j]) {
      p.out[idx] = 0.f;
      continue;
    }
    const float* in = ws.reduced + bh * p.C;
    const int64_t lo = imax(0, j - half), hi = imin(p.C - 1, j + half);
    float v;
    if (p.max_pool) {
      v = -CUDART_INF_F;
      for (int64_t t = lo; t <= hi; ++t) {
        if (mask == nullptr || mask[t]) v = fmaxf(v, in[t]);
      }
    } else {
      float sum = 0.f;
      for (int64_t t = lo; t <= hi; ++t) sum += in[t];
      v = sum / static_cast<float>(p.pool_kernel);
    }
    p.out[idx] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// key_diversity.
//
// Pass 1 (unit_key_partial): block (bh, split) sums the unit keys of the real tokens of its
// chunk of kTokensPerChunk or fewer tokens; one warp per token (norm by warp shuffles), per-warp
// accumulators in shared memory, summed over the warps in order into partial [BH, splits, D].
// Pass 2 (key_mean_finalize): one block per head sums the splits in fp64 (in order), writes the
// mean unit key m [BH, D] and the redundancy. Pass 3 (key_diversity_dot): one warp per
// candidate, -(k . m) / max(|k|, 1e-12). K is read once in full and once more for candidates.
//
// Workspace: partial [BH * splits * D], then (at an offset rounded up to 8 floats) mean [BH * D].

constexpr int kPartialMaxThreads = 256;
constexpr int64_t kTokensPerChunk = 512;
constexpr int kFinalizeThreads = 256;
constexpr int kDotThreads = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct DiversityWorkspace {
  float *partial, *mean;
  __host__ __device__ explicit DiversityWorkspace(const KeyDiversity& p) {
    partial = p.workspace;
    mean = p.workspace + (p.B * p.Hkv * p.splits * p.D + 7) / 8 * 8;
  }
};

// V consecutive elements, loaded with one instruction when the address is V-element aligned.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(ptr);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = to_float(pack.v[e]);
}

// acc[0 .. V) += v * scale (16-byte shared-memory accesses when V is a multiple of 4; the
// caller guarantees the alignment then: D % V == 0).
template <int V>
__device__ __forceinline__ void add_scaled(float* acc, const float (&v)[V], float scale) {
  if constexpr (V % 4 == 0) {
    float4* acc4 = reinterpret_cast<float4*>(acc);
#pragma unroll
    for (int k = 0; k < V / 4; ++k) {
      float4 a = acc4[k];
      a.x += v[4 * k] * scale;
      a.y += v[4 * k + 1] * scale;
      a.z += v[4 * k + 2] * scale;
      a.w += v[4 * k + 3] * scale;
      acc4[k] = a;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] += v[e] * scale;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kPartialMaxThreads) unit_key_partial(const KeyDiversity p) {
  extern __shared__ float4 shared_acc[];  // [warps, D] floats
  float* acc_all = reinterpret_cast<float*>(shared_acc);
  const DiversityWorkspace ws(p);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t D = p.D, packs = D / V;
  const int64_t bh = blockIdx.x / p.splits, split = blockIdx.x % p.splits, b = bh / p.Hkv;

  for (int64_t d = threadIdx.x; d < warps * D; d += blockDim.x) acc_all[d] = 0.f;
  __syncthreads();

  float* acc = acc_all + warp * D;
  const int64_t chunk = (p.N + p.splits - 1) / p.splits;
  const int64_t t_begin = split * chunk, t_end = imin(p.N, t_begin + chunk);
  const T* keys = static_cast<const T*>(p.keys) + bh * p.N * D;
  const bool* mask = p.key_mask != nullptr ? p.key_mask + b * p.N : nullptr;
  for (int64_t t = t_begin + warp; t < t_end; t += warps) {
    if (mask != nullptr && !mask[t]) continue;  // uniform over the warp
    const T* x = keys + t * D;
    float sq = 0.f;
    for (int64_t q = lane; q < packs; q += 32) {
      float v[V];
      load_pack<T, V>(x + q * V, v);
#pragma unroll
      for (int e = 0; e < V; ++e) sq += v[e] * v[e];
    }
    sq = warp_reduce(sq, Sum{});
    const float inv = 1.f / fmaxf(sqrtf(sq), 1e-12f);
    for (int64_t q = lane; q < packs; q += 32) {
      float v[V];
      load_pack<T, V>(x + q * V, v);
      add_scaled<V>(acc + q * V, v, inv);
    }
  }
  __syncthreads();

  float* partial = ws.partial + (bh * p.splits + split) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += acc_all[w * D + d];
    partial[d] = s;
  }
}

__global__ void __launch_bounds__(kFinalizeThreads) key_mean_finalize(const KeyDiversity p) {
  const DiversityWorkspace ws(p);
  const int64_t bh = blockIdx.x, b = bh / p.Hkv, D = p.D;
  long long n = p.N;  // real tokens of the row, window included
  if (p.key_mask != nullptr) {
    long long count = 0;
    for (int64_t t = threadIdx.x; t < p.N; t += blockDim.x) count += p.key_mask[b * p.N + t] ? 1 : 0;
    n = block_reduce(count, Sum{});
  }
  const double divisor = static_cast<double>(n > 1 ? n : 1);
  const float* partial = ws.partial + bh * p.splits * D;
  float* mean = ws.mean + bh * D;
  double mean_sq = 0.0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double total = 0.0;
    for (int64_t s = 0; s < p.splits; ++s) total += partial[s * D + d];
    const double m = total / divisor;
    mean[d] = static_cast<float>(m);
    mean_sq += m * m;
  }
  mean_sq = block_reduce(mean_sq, Sum{});
  if (threadIdx.x == 0) {
    // Mean pairwise cosine similarity from |m|^2: (n |m|^2 - 1) / (n - 1), clipped to [0, 1].
    const double r = n >= 2 ? (static_cast<double>(n) * mean_sq - 1.0) / static_cast<double>(n - 1)
                            : 0.0;
    p.redundancy[bh] = static_cast<float>(r < 0.0 ? 0.0 : (r > 1.0 ? 1.0 : r));
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kDotThreads) key_diversity_dot(const KeyDiversity p) {
  constexpr int kWarps = kDotThreads / 32;
  const DiversityWorkspace ws(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = p.B * p.Hkv * p.C, packs = p.D / V;
  const T* keys = static_cast<const T*>(p.keys);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t bh = row / p.C, j = row % p.C, b = bh / p.Hkv;
    if (p.key_mask != nullptr && !p.key_mask[b * p.N + j]) {  // uniform over the warp
      if (lane == 0) p.diversity[row] = 0.f;
      continue;
    }
    const T* x = keys + (bh * p.N + j) * p.D;
    const float* m = ws.mean + bh * p.D;
    float dot = 0.f, sq = 0.f;
    for (int64_t q = lane; q < packs; q += 32) {
      float v[V], mv[V];
      load_pack<T, V>(x + q * V, v);
      load_pack<float, V>(m + q * V, mv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        sq += v[e] * v[e];
        dot += v[e] * mv[e];
      }
    }
    dot = warp_reduce(dot, Sum{});
    sq = warp_reduce(sq, Sum{});
    if (lane == 0) p.diversity[row] = -dot * (1.f / fmaxf(sqrtf(sq), 1e-12f));
  }
}

template <typename T, int V>
void launch_key_diversity_typed(const KeyDiversity& p, cudaStream_t stream) {
  const int64_t BH = p.B * p.Hkv, D = p.D;
  int64_t warps = kKeyDiversityMaxHeadDim / (D > 0 ? D : 1);
  warps = warps < 1 ? 1 : (warps > kPartialMaxThreads / 32 ? kPartialMaxThreads / 32 : warps);
  const size_t shared = static_cast<size_t>(warps * D) * sizeof(float);
  unit_key_partial<T, V><<<static_cast<unsigned>(BH * p.splits), static_cast<unsigned>(warps * 32),
                           shared, stream>>>(p);
  key_mean_finalize<<<static_cast<unsigned>(BH), kFinalizeThreads, 0, stream>>>(p);
  const int64_t rows = BH * p.C;
  if (rows > 0) {
    key_diversity_dot<T, V><<<grid_for(rows, kDotThreads / 32), kDotThreads, 0, stream>>>(p);
  }
}

// ---------------------------------------------------------------------------------------------
// mix_scores: one block per (row, KV head), three passes over its candidates (statistics,
// mean of the min-max normalised scores, output), fp64 sums as on the CPU.

constexpr int kMixThreads = 512;

__global__ void __launch_bounds__(kMixThreads) mix_scores_kernel(const MixScores p) {
  const int64_t bh = blockIdx.x, b = bh / p.Hkv, C = p.C;
  const bool* mask = p.key_mask != nullptr ? p.key_mask + b * p.mask_stride : nullptr;
  const bool use_v = mode_uses_value_norm(p.mode), use_d = mode_uses_diversity(p.mode);
  const float* a = p.importance + bh * C;
  const float* v = use_v ? p.value_norm + bh * C : nullptr;
  const float* d = use_d ? p.diversity + bh * C : nullptr;

  // Pass 1: sum of A, real candidate count, min/max of V and D over real candidates.
  double sum_a = 0.0;
  long long count = 0;
  float v_lo = FLT_MAX, v_hi = -FLT_MAX, d_lo = FLT_MAX, d_hi = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    if (mask != nullptr && !mask[j]) continue;
    sum_a += a[j];
    ++count;
    if (use_v) {
      v_lo = fminf(v_lo, v[j]);
      v_hi = fmaxf(v_hi, v[j]);
    }
    if (use_d) {
      d_lo = fminf(d_lo, d[j]);
      d_hi = fmaxf(d_hi, d[j]);
    }
  }
  sum_a = block_reduce(sum_a, Sum{});
  count = block_reduce(count, Sum{});
  if (use_v) {  // uniform over the block
    v_lo = block_reduce(v_lo, Min{});
    v_hi = block_reduce(v_hi, Max{});
  }
  if (use_d) {
    d_lo = block_reduce(d_lo, Min{});
    d_hi = block_reduce(d_hi, Max{});
  }
  const float v_spread = v_hi - v_lo, d_spread = d_hi - d_lo;

  // Pass 2: means of the min-max normalised V and D (0 where the spread is not positive).
  double sum_v = 0.0, sum_d = 0.0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    if (mask != nullptr && !mask[j]) continue;
    if (use_v) sum_v += unit_scaled(v[j], v_lo, v_spread);
    if (use_d) sum_d += unit_scaled(d[j], d_lo, d_spread);
  }
  if (use_v) sum_v = block_reduce(sum_v, Sum{});
  if (use_d) sum_d = block_reduce(sum_d, Sum{});
  const double real = static_cast<double>(count > 1 ? count : 1);
  const double mean_a = sum_a / real, mean_v = sum_v / real, mean_d = sum_d / real;
  // Rescale so each normalised score's mean equals mean(A); 0 when its mean is 0 (never NaN).
  const float v_factor = mean_v > 0.0 ? static_cast<float>(mean_a / mean_v) : 0.f;
  const float d_factor = mean_d > 0.0 ? static_cast<float>(mean_a / mean_d) : 0.f;
  const float r = mode_uses_redundancy(p.mode) ? p.redundancy[bh] : 0.f;

  // Pass 3: the mix.
  float* out = p.out + bh * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    if (mask != nullptr && !mask[j]) {
      out[j] = 0.f;
      continue;
    }
    const float vt = use_v ? mul_rn(unit_scaled(v[j], v_lo, v_spread), v_factor) : 0.f;
    const float dt = use_d ? mul_rn(unit_scaled(d[j], d_lo, d_spread), d_factor) : 0.f;
    const float s = mix_score(p.mode, a[j], vt, dt, r);
    out[j] = s;
  }
}

}  // namespace

int64_t window_importance_workspace(const WindowImportance& p) {
  const int64_t BH = p.B * p.Hkv;
  return 2 * BH * p.G * p.W + BH * p.C;
}

void launch_window_importance(const WindowImportance& p, cudaStream_t stream) {
  const int64_t BH = p.B * p.Hkv, rows = BH * p.G * p.W;
  if (BH * p.C == 0 || rows == 0) return;
  importance_row_stats<<<static_cast<unsigned>(rows), kStatsThreads, 0, stream>>>(p);
  const int64_t tiles = (p.C + kAggregateThreads - 1) / kAggregateThreads;
  const unsigned blocks = static_cast<unsigned>(BH * tiles);
  if (p.max_reduce) {
    importance_aggregate<true><<<blocks, kAggregateThreads, 0, stream>>>(p, tiles);
  } else {
    importance_aggregate<false><<<blocks, kAggregateThreads, 0, stream>>>(p, tiles);
  }
  importance_pool<<<grid_for(BH * p.C, kPoolThreads), kPoolThreads, 0, stream>>>(p);
}

int64_t plan_key_diversity(KeyDiversity& p) {
  p.splits = p.N > 0 ? (p.N + kTokensPerChunk - 1) / kTokensPerChunk : 1;
  const int64_t BH = p.B * p.Hkv;
  return round_up(BH * p.splits * p.D, 8) + BH * p.D;
}

void launch_key_diversity(const KeyDiversity& p, cudaStream_t stream) {
  if (p.B * p.Hkv == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);  // 16-byte loads
    const bool aligned = p.D % kVec == 0 && reinterpret_cast<uintptr_t>(p.keys) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(p.workspace) % 32 == 0;
    if (aligned) {
      launch_key_diversity_typed<T, kVec>(p, stream);
    } else {
      launch_key_diversity_typed<T, 1>(p, stream);
    }
  });
}

void launch_mix_scores(const MixScores& p, cudaStream_t stream) {
  const int64_t BH = p.B * p.Hkv;
  if (BH == 0 || p.C == 0) return;
  mix_scores_kernel<<<static_cast<unsigned>(BH), kMixThreads, 0, stream>>>(p);
}

}  // namespace mixkv::cuda

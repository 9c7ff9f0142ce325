// ragged_attention on CUDA, flash-decoding style, float32 online softmax.
// Pass 1: one block per (segment, block of up to kRows of its KV head's G*q query rows, token
// split) streams its share of the segment once for all those rows and writes each row's
// partial state (max logit m, sum l, weighted values acc) to the workspace.
// Pass 2: one block per (segment, query row) merges the splits and writes the output row.
#include <algorithm>

#include <math_constants.h>

#include "cuda/dtype.cuh"

namespace mixkv::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;   // query rows per block: a whole GQA group for G <= 8 and q = 1
constexpr int kTile = 32;  // tokens per step: one per lane in the softmax update
constexpr int kDimsPerThread = kRaggedAttentionMaxHeadDim / kThreads;
constexpr int64_t kMaxSplits = 32;
constexpr int64_t kMinSplitTokens = 256;

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

struct Segment {
  int64_t start, len;
  bool ok;  // inside the buffer and holding the q query tokens
};

__device__ Segment segment_of(const RaggedAttention& p, int64_t s) {
  const int64_t start = p.starts[s], len = p.lengths[s];
  return {start, len, start >= 0 && len >= p.q && start + len <= p.S};
}

// Workspace: for global query row `row` (= segment * G*q + row in group) and split c, slot
// row * splits + c holds m, l (two [rows * splits] arrays) and acc (a [rows * splits, D] array).
struct Partials {
  float *m, *l, *acc;
  __device__ Partials(const RaggedAttention& p) {
    const int64_t slots = p.B * p.Hq * p.q * p.splits;
    m = p.workspace;
    l = m + slots;
    acc = l + slots;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attend_split(const RaggedAttention p, int64_t row_blocks) {
  __shared__ float qs[kRows][kRaggedAttentionMaxHeadDim];  // scaled queries
  __shared__ float scores[kRows][kTile];  // logits of the tile, then their softmax weights
  __shared__ float m_s[kRows], l_s[kRows], alpha_s[kRows];

  const int64_t G = p.Hq / p.Hkv, R = G * p.q, D = p.D;
  const int64_t s = blockIdx.x / row_blocks, row0 = (blockIdx.x % row_blocks) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), R - row0));
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Segment seg = segment_of(p, s);
  const T* keys = static_cast<const T*>(p.keys);
  const T* values = static_cast<const T*>(p.values);

  // The KV head's query rows are contiguous in query [B, Hq, q, D]: row r = g * q + i.
  const T* query = static_cast<const T*>(p.query) + (s * R + row0) * D;
  for (int64_t idx = tid; idx < kRows * D; idx += kThreads) {
    const int64_t r = idx / D;
    qs[r][idx % D] = r < rows ? to_float(query[idx]) * p.scale : 0.f;
  }
  if (tid < kRows) {
    m_s[tid] = -CUDART_INF_F;
    l_s[tid] = 0.f;
  }
  // Query i of the segment is its token len - q + i: it sees tokens < len - q + i + 1.
  int64_t visible_end[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) visible_end[r] = seg.len - p.q + (row0 + r) % p.q + 1;

  const int64_t chunk = (seg.len + p.splits - 1) / p.splits;
  const int64_t t_begin = blockIdx.y * chunk;
  const int64_t t_end = seg.ok ? min(seg.len, t_begin + chunk) : 0;
  float acc[kRows][kDimsPerThread] = {};
  __syncthreads();

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
    // 1. Logits: each warp scores every kWarps-th token of the tile, lanes splitting D.
    for (int j = warp; j < kTile; j += kWarps) {
      const int64_t t = t0 + j;
      float dot[kRows] = {};
      if (t < t_end) {
        const T* k = keys + (seg.start + t) * D;
        for (int64_t d = lane; d < D; d += 32) {
          const float kd = to_float(k[d]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r < rows) dot[r] += qs[r][d] * kd;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) dot[r] = warp_sum(dot[r]);  // rows is uniform over the block
      }
      if (lane == 0) {
        const bool token_ok = t < t_end && (p.valid == nullptr || p.valid[seg.start + t]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          scores[r][j] = token_ok && r < rows && t < visible_end[r] ? dot[r] : -CUDART_INF_F;
        }
      }
    }
    __syncthreads();
    // 2. Online softmax: each warp updates some rows, one token per lane.
    for (int r = warp; r < kRows; r += kWarps) {
      const float x = scores[r][lane];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(x));
      const float w = x == -CUDART_INF_F ? 0.f : expf(x - m_new);
      scores[r][lane] = w;
      const float sum = warp_sum(w);
      if (lane == 0) {
        const float alpha = m_old == -CUDART_INF_F ? 0.f : expf(m_old - m_new);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
    // 3. acc = alpha * acc + sum of w * v; thread tid owns head dims tid + c * kThreads.
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), t_end - t0));
#pragma unroll
    for (int c = 0; c < kDimsPerThread; ++c) {
      const int64_t d = tid + c * kThreads;
      if (d < D) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r][c] *= alpha_s[r];
        for (int j = 0; j < n; ++j) {
          const float v = to_float(values[(seg.start + t0 + j) * D + d]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            // Skipping zero weights keeps whatever padding slots hold (even NaN) out.
            if (scores[r][j] != 0.f) acc[r][c] += scores[r][j] * v;
          }
        }
      }
    }
    __syncthreads();  // the next tile rewrites scores and alpha_s
  }

  const Partials out(p);
  const int64_t slot0 = (s * R + row0) * p.splits + blockIdx.y;
  if (tid < rows) {
    out.m[slot0 + tid * p.splits] = m_s[tid];
    out.l[slot0 + tid * p.splits] = l_s[tid];
  }
#pragma unroll
  for (int c = 0; c < kDimsPerThread; ++c) {
    const int64_t d = tid + c * kThreads;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (d < D && r < rows) out.acc[(slot0 + r * p.splits) * D + d] = acc[r][c];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits(const RaggedAttention p) {
  const int64_t G = p.Hq / p.Hkv, R = G * p.q, row = blockIdx.x;
  const int64_t s = row / R, r = row % R, b = s / p.Hkv, h = s % p.Hkv;
  const Partials in(p);
  const float* m = in.m + row * p.splits;
  const float* l = in.l + row * p.splits;
  const float* acc = in.acc + row * p.splits * p.D;
  float m_max = -CUDART_INF_F;
  for (int64_t c = 0; c < p.splits; ++c) m_max = fmaxf(m_max, m[c]);
  float sum = 0.f;
  for (int64_t c = 0; c < p.splits; ++c) {
    if (m[c] != -CUDART_INF_F) sum += expf(m[c] - m_max) * l[c];
  }
  const bool ok = segment_of(p, s).ok;
  T* dst = static_cast<T*>(p.out) + ((b * p.q + r % p.q) * p.Hq + h * G + r / p.q) * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
    float o = 0.f;  // a row that saw no valid token
    if (!ok) {
      o = CUDART_NAN_F;
    } else if (m_max != -CUDART_INF_F) {
      for (int64_t c = 0; c < p.splits; ++c) {
        if (m[c] != -CUDART_INF_F) o += expf(m[c] - m_max) * acc[c * p.D + d];
      }
      o /= sum;
    }
    dst[d] = from_float<T>(o);
  }
}

int64_t row_blocks_of(const RaggedAttention& p) {
  return (p.Hq / p.Hkv * p.q + kRows - 1) / kRows;
}

}  // namespace

int64_t plan_ragged_attention(RaggedAttention& p, int device) {
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();  // not fatal: plan for one SM
    sms = 1;
  }
  // Enough splits for about four blocks per SM, none shorter than kMinSplitTokens rows of an
  // average segment (S / segments, spare rows included: the lengths stay on the device).
  const int64_t segments = p.B * p.Hkv, blocks = segments * row_blocks_of(p);
  const int64_t wanted = (4 * sms + blocks - 1) / blocks;
  const int64_t fit = p.S / (segments * kMinSplitTokens);
  p.splits = std::max<int64_t>(1, std::min({wanted, fit, kMaxSplits}));
  return p.B * p.Hq * p.q * p.splits * (p.D + 2);
}

void launch_ragged_attention(const RaggedAttention& p, cudaStream_t stream) {
  const int64_t row_blocks = row_blocks_of(p);
  const dim3 split_grid(static_cast<unsigned>(p.B * p.Hkv * row_blocks),
                        static_cast<unsigned>(p.splits));
  const unsigned rows = static_cast<unsigned>(p.B * p.Hq * p.q);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    attend_split<T><<<split_grid, kThreads, 0, stream>>>(p, row_blocks);
    merge_splits<T><<<rows, kThreads, 0, stream>>>(p);
  });
}

}  // namespace mixkv::cuda

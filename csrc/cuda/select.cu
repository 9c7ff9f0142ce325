// Selection kernels on CUDA (see select.cuh).
//
// select_positions: one block of 256 threads per head (b, h). Every candidate j gets a 32-bit
// order key u(j): 0 for a padded candidate, else the float32 score mapped to an
// order-preserving unsigned integer (-0 folded onto +0, so equal scores give equal keys; every
// finite score maps above 0, so real candidates outrank padded ones). The full order of the
// CPU op is (u descending, position ascending), whose keys are all distinct, so the k best are
//   { j : u(j) > t }  plus the `need` lowest positions among { j : u(j) == t },
// where t is the k-th largest u and need = k - #{u > t}. A 4-pass radix select (8 bits per
// pass, 256-bin shared histogram with warp-aggregated atomics, block scan over the bins from
// the top) finds t and need exactly. One more pass in position order then compacts the chosen
// candidates: a block-wide exclusive scan of the packed pair (#{u > t}, #{u == t}) gives each
// chosen candidate its output slot #{u > t before it} + min(#{u == t before it}, need), so
// the output is in ascending position order and holds exactly k positions. The window
// positions follow. Everything is integer arithmetic on the scores' bits: deterministic, and
// bit-identical to the CPU op's nth_element with its (real, score, position) comparator.
//
// gather_rows: a flat grid-stride copy of kept K/V rows in the widest vector (16, 8, 4 or 2
// bytes) that divides the row size and all four base addresses.
#include <cub/block/block_scan.cuh>

#include "cuda/select.cuh"

namespace mixkv::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBins = 256;  // one bin per thread in the radix select
constexpr int kItems = 4;   // consecutive candidates per thread in the compaction pass
static_assert(kThreads == kBins, "the bin scan gives each thread one bin");

// Order-preserving key of a candidate: larger key = better candidate.
__device__ __forceinline__ uint32_t order_key(float score, bool real) {
  if (!real) return 0u;
  uint32_t bits = __float_as_uint(score);
  if ((bits & 0x7fffffffu) == 0u) bits = 0u;  // -0 == +0: a tie, decided by position
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ bool is_real(const bool* row_mask, int64_t j) {
  return row_mask == nullptr || row_mask[j];
}

__global__ void __launch_bounds__(kThreads) select_positions_kernel(const SelectPositions p) {
  using Scan32 = cub::BlockScan<uint32_t, kThreads>;
  using Scan64 = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename Scan32::TempStorage s32;
    typename Scan64::TempStorage s64;
  } temp;
  __shared__ uint32_t hist[kBins];
  __shared__ uint32_t s_digit, s_need;

  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t bh = blockIdx.x, C = p.N - p.W;
  const float* scores = p.scores + bh * C;
  const bool* mask = p.key_mask == nullptr ? nullptr : p.key_mask + (bh / p.Hkv) * p.N;
  int64_t dst, k;
  if (p.offsets != nullptr) {
    dst = p.offsets[bh];
    k = static_cast<int64_t>(p.offsets[bh + 1]) - dst - p.W;
  } else {
    k = p.dense_k;
    dst = bh * (k + p.W);
  }
  k = k < 0 ? 0 : (k > C ? C : k);  // the glue guarantees 0 <= k <= C; never write past it
  int32_t* out = p.kept + dst;

  // Threshold key t and how many candidates with key t to keep (block-uniform).
  uint32_t thresh, need;
  if (k >= C) {  // everything: every key is >= 0
    thresh = 0u;
    need = static_cast<uint32_t>(C);
  } else if (k == 0) {  // nothing: no key is > UINT32_MAX, and none of the ties is needed
    thresh = 0xffffffffu;
    need = 0u;
  } else {
    uint32_t prefix = 0u, prefix_mask = 0u;
    need = static_cast<uint32_t>(k);  // invariant: 1 <= need <= #{candidates matching prefix}
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0u;
      __syncthreads();
      for (int64_t base = 0; base < C; base += kThreads) {  // uniform trip count: full warps
        const int64_t j = base + tid;
        int bin = -1;
        if (j < C) {
          const uint32_t u = order_key(scores[j], is_real(mask, j));
          if ((u & prefix_mask) == prefix) bin = static_cast<int>((u >> shift) & 0xffu);
        }
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      // Thread i holds bin 255 - i: the inclusive scan counts the candidates in bins >= it.
      const uint32_t count = hist[kBins - 1 - tid];
      uint32_t at_least;
      Scan32(temp.s32).InclusiveSum(count, at_least);
      const uint32_t above = at_least - count;
      if (above < need && at_least >= need) {  // exactly one thread
        s_digit = static_cast<uint32_t>(kBins - 1 - tid);
        s_need = need - above;
      }
      __syncthreads();
      prefix |= s_digit << shift;
      prefix_mask |= 0xffu << shift;
      need = s_need;
      __syncthreads();  // hist, temp and s_digit are reused by the next pass
    }
    thresh = prefix;
  }

  // Ordered compaction; also the finiteness check of the real candidates.
  bool bad = false;
  uint32_t carry_gt = 0u, carry_eq = 0u;
  for (int64_t base = 0; base < C; base += static_cast<int64_t>(kThreads) * kItems) {
    const int64_t first = base + static_cast<int64_t>(tid) * kItems;
    uint32_t keys[kItems];
    uint32_t gt = 0u, eq = 0u;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = first + i;
      keys[i] = 0u;
      if (j < C) {
        const float s = scores[j];
        const bool real = is_real(mask, j);
        bad |= real && !isfinite(s);
        keys[i] = order_key(s, real);
        gt += keys[i] > thresh;
        eq += keys[i] == thresh;
      }
    }
    unsigned long long before, total;
    Scan64(temp.s64).ExclusiveSum(static_cast<unsigned long long>(gt) |
                                      (static_cast<unsigned long long>(eq) << 32),
                                  before, total);
    uint32_t g = carry_gt + static_cast<uint32_t>(before);
    uint32_t e = carry_eq + static_cast<uint32_t>(before >> 32);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = first + i;
      if (j >= C) break;
      if (keys[i] > thresh) {
        out[g + (e < need ? e : need)] = static_cast<int32_t>(j);
        ++g;
      } else if (keys[i] == thresh) {
        if (e < need) out[g + e] = static_cast<int32_t>(j);
        ++e;
      }
    }
    carry_gt += static_cast<uint32_t>(total);
    carry_eq += static_cast<uint32_t>(total >> 32);
    __syncthreads();  // temp is reused by the next chunk
  }
  if (bad && p.nonfinite != nullptr) *p.nonfinite = 1;  // benign race: every writer stores 1

  for (int64_t i = tid; i < p.W; i += kThreads) out[k + i] = static_cast<int32_t>(C + i);
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const Vec* __restrict__ keys, const Vec* __restrict__ values,
                       Vec* __restrict__ out_keys, Vec* __restrict__ out_values,
                       const int32_t* __restrict__ kept, const int32_t* __restrict__ offsets,
                       int64_t rows_per_head, int64_t BH, int64_t N, int64_t V, int64_t units) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < units;
       i += stride) {
    const int64_t t = i / V, v = i - t * V;
    int64_t bh;
    if (offsets == nullptr) {
      bh = t / rows_per_head;
    } else {  // the last segment starting at or before t (offsets strictly increase, W >= 1)
      int64_t lo = 0, hi = BH - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= t) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      bh = lo;
    }
    const int64_t src = (bh * N + kept[t]) * V + v;
    out_keys[i] = keys[src];
    out_values[i] = values[src];
  }
}

template <typename Vec>
void gather(const void* keys, const void* values, void* out_keys, void* out_values,
            const int32_t* kept, const int32_t* offsets, int64_t rows_per_head, int64_t T,
            int64_t BH, int64_t N, int64_t row_bytes, cudaStream_t stream) {
  const int64_t V = row_bytes / static_cast<int64_t>(sizeof(Vec)), units = T * V;
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  gather_rows_kernel<Vec><<<grid, kThreads, 0, stream>>>(
      static_cast<const Vec*>(keys), static_cast<const Vec*>(values), static_cast<Vec*>(out_keys),
      static_cast<Vec*>(out_values), kept, offsets, rows_per_head, BH, N, V, units);
}

__global__ void __launch_bounds__(kThreads)
    ragged_offsets_kernel(const int32_t* __restrict__ capacity, int32_t* __restrict__ offsets,
                          int64_t* __restrict__ status, int64_t BH, int64_t C, int64_t W) {
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ unsigned long long first_negative;
  const int tid = threadIdx.x;
  if (tid == 0) {
    offsets[0] = 0;
    first_negative = static_cast<unsigned long long>(BH);
  }
  __syncthreads();
  long long carry = 0;
  for (int64_t base = 0; base < BH; base += kThreads) {
    const int64_t i = base + tid;
    long long len = 0;
    if (i < BH) {
      const int64_t c = capacity[i];
      if (c < 0) atomicMin(&first_negative, static_cast<unsigned long long>(i));
      len = (c < 0 ? 0 : (c < C ? c : C)) + W;
    }
    long long upto, total;
    Scan(temp).InclusiveSum(len, upto, total);
    if (i < BH) {
      const long long end = carry + upto;
      offsets[i + 1] = static_cast<int32_t>(end < 0x7fffffffLL ? end : 0x7fffffffLL);
    }
    carry += total;
    __syncthreads();
  }
  if (tid == 0) {
    status[0] = carry;
    status[1] = first_negative == static_cast<unsigned long long>(BH)
                    ? -1
                    : static_cast<int64_t>(first_negative);
  }
}

__global__ void __launch_bounds__(kThreads)
    check_finite_kernel(const float* __restrict__ scores, const bool* __restrict__ key_mask,
                        int64_t* __restrict__ flag, int64_t Hkv, int64_t N, int64_t C,
                        int64_t total) {
  bool bad = false;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += stride) {
    if (isfinite(scores[i])) continue;
    const int64_t bh = i / C, j = i - bh * C;
    bad |= key_mask == nullptr || key_mask[(bh / Hkv) * N + j];
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

void launch_select_positions(const SelectPositions& p, cudaStream_t stream) {
  const int64_t BH = p.B * p.Hkv;
  if (BH == 0) return;
  select_positions_kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(p);
}

void launch_gather_rows(const void* keys, const void* values, void* out_keys, void* out_values,
                        const int32_t* kept, const int32_t* offsets, int64_t rows_per_head,
                        int64_t T, int64_t BH, int64_t N, int64_t row_bytes, cudaStream_t stream) {
  if (T == 0 || row_bytes == 0) return;
  auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && aligned(keys, bytes) && aligned(values, bytes) &&
           aligned(out_keys, bytes) && aligned(out_values, bytes);
  };
  // Element sizes are 2 or 4 bytes, so 2-byte units always fit.
  if (fits(16)) {
    gather<uint4>(keys, values, out_keys, out_values, kept, offsets, rows_per_head, T, BH, N,
                  row_bytes, stream);
  } else if (fits(8)) {
    gather<uint2>(keys, values, out_keys, out_values, kept, offsets, rows_per_head, T, BH, N,
                  row_bytes, stream);
  } else if (fits(4)) {
    gather<uint32_t>(keys, values, out_keys, out_values, kept, offsets, rows_per_head, T, BH, N,
                     row_bytes, stream);
  } else {
    gather<uint16_t>(keys, values, out_keys, out_values, kept, offsets, rows_per_head, T, BH, N,
                     row_bytes, stream);
  }
}

void launch_ragged_offsets(const int32_t* capacity, int32_t* offsets, int64_t* status, int64_t BH,
                           int64_t C, int64_t W, cudaStream_t stream) {
  ragged_offsets_kernel<<<1, kThreads, 0, stream>>>(capacity, offsets, status, BH, C, W);
}

void launch_check_finite(const float* scores, const bool* key_mask, int64_t* flag, int64_t B,
                         int64_t Hkv, int64_t N, int64_t C, cudaStream_t stream) {
  const int64_t total = B * Hkv * C;
  if (total == 0) return;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  check_finite_kernel<<<grid, kThreads, 0, stream>>>(scores, key_mask, flag, Hkv, N, C, total);
}

}  // namespace mixkv::cuda

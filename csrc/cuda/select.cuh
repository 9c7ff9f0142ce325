// Launchers of the selection kernels behind select_kv, select_kv_ragged, compress and
// compress_ragged on CUDA: raw pointers and sizes only, no torch headers (see kernels.cuh); select.cpp and budgets.cpp hold the torch-facing glue.
//
// Per (row b, KV head h), "bh" = b * Hkv + h, the kept positions are the k best candidates in
// ascending position order (real before padded, then higher score, then lower position),
// followed by the W window positions C .. N-1 (C = N - W). Dense layout: head bh owns kept
// rows bh * (k + W) .. with one k for every head. Ragged layout: head bh owns kept rows
// offsets[bh] .. offsets[bh + 1], k = offsets[bh + 1] - offsets[bh] - W.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mixkv::cuda {

struct SelectPositions {
  const float* scores;     // [B * Hkv, C] contiguous float32
  const bool* key_mask;    // [B, N] or nullptr (every token real)
  const int32_t* offsets;  // [B * Hkv + 1] (ragged) or nullptr (dense)
  int32_t* kept;           // kept positions, [B * Hkv * (k + W)] (dense) or [offsets[B * Hkv]]
  int64_t* nonfinite;      // set to 1 when a real candidate's score is NaN/inf; may be nullptr
  int64_t dense_k;         // dense: candidates kept per head (<= C); ignored when ragged
  int64_t B, Hkv, N, W;
};

// One block per head: radix select of the k-th best (score, position) key, then an ordered
// compaction. Needs N <= INT32_MAX (checked by the glue).
void launch_select_positions(const SelectPositions& p, cudaStream_t stream);

// out_keys/out_values row t = keys/values[bh(t), kept[t], :] for t < T, rows of row_bytes bytes;
// keys/values are [B * Hkv, N, row] contiguous. bh(t) = t / rows_per_head (dense, offsets ==
// nullptr) or the segment of t in offsets [BH + 1] (ragged).
void launch_gather_rows(const void* keys, const void* values, void* out_keys, void* out_values,
                        const int32_t* kept, const int32_t* offsets, int64_t rows_per_head,
                        int64_t T, int64_t BH, int64_t N, int64_t row_bytes, cudaStream_t stream);

// Ragged bookkeeping in one single-block kernel: offsets[0] = 0, offsets[i + 1] = offsets[i] +
// min(capacity[i], C) + W (clamped to INT32_MAX), status[0] = the int64 total, status[1] = the
// first i with capacity[i] < 0 or -1. status[2] is left alone (the finiteness flag).
void launch_ragged_offsets(const int32_t* capacity, int32_t* offsets, int64_t* status, int64_t BH,
                           int64_t C, int64_t W, cudaStream_t stream);

// *flag = 1 if some real candidate of scores [B * Hkv, C] is NaN or inf (flag is not cleared).
void launch_check_finite(const float* scores, const bool* key_mask, int64_t* flag, int64_t B,
                         int64_t Hkv, int64_t N, int64_t C, cudaStream_t stream);

}  // namespace mixkv::cuda

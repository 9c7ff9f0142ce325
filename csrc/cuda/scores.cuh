// Launchers of the CUDA score kernels (window_importance, key_diversity, mix_scores): raw
// pointers and sizes only, no torch headers. scores.cpp holds the torch-facing glue.
//
// Notation: B batch, Hkv KV heads, G query heads per KV head, W window, N prompt length, D head
// dim, C = N - W candidates, BH = B * Hkv. key_mask is [B, mask_stride] bool (true = real
// token) or nullptr (every token real). Every pointer is to contiguous memory.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#include "mixkv/mix.h"

namespace mixkv::cuda {

// window_importance after the logits GEMM. logits [BH, G * W, N] float32 holds the unscaled
// q . k of query row r = g * W + i (window query i of the group's query head g) and key j.
// Row statistics (max, 1 / (softmax denominator * real window queries)) go to the workspace,
// then per candidate the softmax weights are summed over the window and reduced over G, and
// finally pooled over candidates into out [BH, C].
struct WindowImportance {
  const float* logits;
  const bool* key_mask;  // [B, N]
  float* workspace;      // window_importance_workspace(...) floats
  float* out;            // [BH, C]
  int64_t B, Hkv, G, W, N, C, pool_kernel;
  float scale;
  bool max_pool;    // pooling "max" (else "avg")
  bool max_reduce;  // gqa_reduce "max" (else "mean")
};

int64_t window_importance_workspace(const WindowImportance& p);
void launch_window_importance(const WindowImportance& p, cudaStream_t stream);

// key_diversity: keys [BH, N, D]; diversity [BH, C]; redundancy [BH].
constexpr int64_t kKeyDiversityMaxHeadDim = 12288;  // per-warp float accumulators in 48 KiB

struct KeyDiversity {
  const void* keys;
  DType dtype;
  const bool* key_mask;  // [B, N]
  float* workspace;      // plan_key_diversity(...) floats
  float* diversity;
  float* redundancy;
  int64_t B, Hkv, N, D, C;
  int64_t splits;  // token chunks per head, set by plan_key_diversity
};

// Sets p.splits and returns the workspace size in floats.
int64_t plan_key_diversity(KeyDiversity& p);
void launch_key_diversity(const KeyDiversity& p, cudaStream_t stream);

// mix_scores: importance, value_norm, diversity [BH, C] float32 (value_norm/diversity may be
// nullptr when the mode does not use them), redundancy [BH] float32 (mode mixkv only).
struct MixScores {
  const float* importance;
  const float* value_norm;
  const float* diversity;
  const float* redundancy;
  const bool* key_mask;  // [B, mask_stride]; candidate j of row b is key_mask[b * mask_stride + j]
  float* out;            // [BH, C]
  int64_t B, Hkv, C, mask_stride;
  Mode mode;
};

void launch_mix_scores(const MixScores& p, cudaStream_t stream);

}  // namespace mixkv::cuda

// Checks and output shapes shared by every backend (see mixkv/shapes.h).
#include "mixkv/shapes.h"

#include "mixkv/checks.h"
#include "mixkv/options.h"

namespace mixkv {
namespace {

using c10::SymInt;

// keys or values [B,Hkv,N,D] with 1 <= W <= N.
void check_kv(const char* op, const char* name, const at::Tensor& kv, int64_t window) {
  check_rank(op, name, kv, 4, "[B, Hkv, N, D]");
  check_kv_dtype(op, name, kv);
  MIXKV_CHECK_VALUE(window >= 1, op, "window must be >= 1, got ", window);
  MIXKV_CHECK_VALUE(kv.sym_size(2) >= window, op, "window (", window,
                    ") is larger than the prompt length N = ", kv.sym_size(2), " of ", name);
}

void check_values_like_keys(const char* op, const at::Tensor& values, const at::Tensor& keys) {
  MIXKV_CHECK_VALUE(values.sym_sizes() == keys.sym_sizes(), op, "values must have the shape of keys ",
                    keys.sym_sizes(), ", got ", values.sym_sizes());
  check_same_dtype(op, "values", values, keys, "keys");
  check_same_device(op, "values", values, keys, "keys");
}

// An int32 [B, H] table per (batch row, KV head) (capacities, segment starts/lengths).
void check_head_table(const char* op, const char* name, const at::Tensor& t, const SymInt& B,
                      const SymInt& H, const at::Tensor& ref, const char* ref_name) {
  MIXKV_CHECK_VALUE(t.dim() == 2 && t.sym_size(0) == B && t.sym_size(1) == H, op, name,
                    " must be [B, Hkv] = [", B, ", ", H, "], got ", t.sym_sizes());
  MIXKV_CHECK_TYPE(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  check_same_device(op, name, t, ref, ref_name);
}

// key_mask [B, N] bool or integer, on the device of `ref`.
void check_key_mask(const char* op, const OptTensor& key_mask, const SymInt& B, const SymInt& N,
                    const at::Tensor& ref, const char* ref_name) {
  if (!key_mask) return;
  const at::Tensor& m = *key_mask;
  MIXKV_CHECK_VALUE(m.dim() == 2 && m.sym_size(0) == B && m.sym_size(1) == N, op,
                    "key_mask must be [B, N] = [", B, ", ", N, "], got ", m.sym_sizes());
  MIXKV_CHECK_TYPE(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false), op,
                   "key_mask must be bool or integer, got ", m.scalar_type());
  check_same_device(op, "key_mask", m, ref, ref_name);
}

// A score tensor [B,Hkv,C] (float32/16, bf16) matching `ref`'s leading dims.
void check_scores(const char* op, const char* name, const at::Tensor& s, const at::Tensor& ref,
                  const char* ref_name) {
  check_rank(op, name, s, 3, "[B, Hkv, C]");
  check_kv_dtype(op, name, s);
  check_same_device(op, name, s, ref, ref_name);
  MIXKV_CHECK_VALUE(s.sym_sizes() == ref.sym_sizes(), op, name, " must have the shape of ",
                    ref_name, " ", ref.sym_sizes(), ", got ", s.sym_sizes());
}

// Scores [B,Hkv,C] for keys/values [B,Hkv,N,D]: C must equal N - window.
void check_scores_for_kv(const char* op, const at::Tensor& scores, const at::Tensor& keys,
                         const at::Tensor& values, int64_t window, const OptTensor& key_mask) {
  check_kv(op, "keys", keys, window);
  check_values_like_keys(op, values, keys);
  check_rank(op, "scores", scores, 3, "[B, Hkv, N - window]");
  MIXKV_CHECK_TYPE(scores.scalar_type() == at::kFloat, op, "scores must be float32, got ",
                   scores.scalar_type());
  check_same_device(op, "scores", scores, keys, "keys");
  MIXKV_CHECK_VALUE(scores.sym_size(0) == keys.sym_size(0) && scores.sym_size(1) == keys.sym_size(1) &&
                        scores.sym_size(2) == keys.sym_size(2) - window,
                    op, "scores must be [B, Hkv, N - window] = [", keys.sym_size(0), ", ",
                    keys.sym_size(1), ", ", keys.sym_size(2) - window, "], got ", scores.sym_sizes());
  check_key_mask(op, key_mask, keys.sym_size(0), keys.sym_size(2), keys, "keys");
}

// A key_mask for score-level ops is [B, N] with N >= C; candidates are its first C columns.
void check_candidate_mask(const char* op, const OptTensor& key_mask, const at::Tensor& scores) {
  if (!key_mask) return;
  const at::Tensor& m = *key_mask;
  MIXKV_CHECK_VALUE(m.dim() == 2 && m.sym_size(0) == scores.sym_size(0) &&
                        m.sym_size(1) >= scores.sym_size(2),
                    op, "key_mask must be [B, N] with B = ", scores.sym_size(0),
                    " and N >= C = ", scores.sym_size(2), ", got ", m.sym_sizes());
  MIXKV_CHECK_TYPE(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false), op,
                   "key_mask must be bool or integer, got ", m.scalar_type());
  check_same_device(op, "key_mask", m, scores, "the scores");
}

Shape check_importance_args(const char* op, const at::Tensor& q_window, const at::Tensor& keys,
                            const OptTensor& key_mask, int64_t pool_kernel,
                            c10::string_view pooling, c10::string_view gqa_reduce) {
  check_rank(op, "q_window", q_window, 4, "[B, Hq, W, D]");
  check_kv_dtype(op, "q_window", q_window);
  const int64_t window = q_window.size(2);
  check_kv(op, "keys", keys, window);
  check_same_device(op, "keys", keys, q_window, "q_window");
  check_same_dtype(op, "keys", keys, q_window, "q_window");
  const SymInt &B = keys.sym_size(0), &Hkv = keys.sym_size(1), &N = keys.sym_size(2);
  MIXKV_CHECK_VALUE(q_window.sym_size(0) == B, op, "q_window has batch ", q_window.sym_size(0),
                    " but keys has ", B);
  MIXKV_CHECK_VALUE(q_window.sym_size(3) == keys.sym_size(3), op, "q_window head dim ",
                    q_window.sym_size(3), " differs from keys head dim ", keys.sym_size(3));
  MIXKV_CHECK_VALUE(Hkv > 0 && q_window.sym_size(1) > 0 && q_window.sym_size(1) % Hkv == 0, op,
                    "q_window heads Hq = ", q_window.sym_size(1),
                    " must be a positive multiple of keys heads Hkv = ", Hkv);
  MIXKV_CHECK_VALUE(pool_kernel >= 1 && pool_kernel % 2 == 1, op,
                    "pool_kernel must be a positive odd number, got ", pool_kernel);
  parse_pooling(op, pooling);
  parse_gqa_reduce(op, gqa_reduce);
  check_key_mask(op, key_mask, B, N, keys, "keys");
  return {B, Hkv, N - window};
}

}  // namespace

Shape window_importance_shape(const at::Tensor& q_window, const at::Tensor& keys,
                              const OptTensor& key_mask, int64_t pool_kernel,
                              c10::string_view pooling, c10::string_view gqa_reduce) {
  return check_importance_args("window_importance", q_window, keys, key_mask, pool_kernel, pooling,
                               gqa_reduce);
}

Shape value_norm_shape(const at::Tensor& values, int64_t window, const OptTensor& key_mask) {
  const char* op = "value_norm";
  check_kv(op, "values", values, window);
  check_key_mask(op, key_mask, values.sym_size(0), values.sym_size(2), values, "values");
  return {values.sym_size(0), values.sym_size(1), values.sym_size(2) - window};
}

std::pair<Shape, Shape> key_diversity_shape(const at::Tensor& keys, int64_t window,
                                            const OptTensor& key_mask) {
  const char* op = "key_diversity";
  check_kv(op, "keys", keys, window);
  check_key_mask(op, key_mask, keys.sym_size(0), keys.sym_size(2), keys, "keys");
  return {{keys.sym_size(0), keys.sym_size(1), keys.sym_size(2) - window},
          {keys.sym_size(0), keys.sym_size(1)}};
}

Shape mix_scores_shape(const at::Tensor& importance, const OptTensor& value_norm,
                       const OptTensor& diversity, const OptTensor& redundancy,
                       c10::string_view mode_name, const OptTensor& key_mask) {
  const char* op = "mix_scores";
  check_rank(op, "importance", importance, 3, "[B, Hkv, C]");
  check_kv_dtype(op, "importance", importance);
  const Mode mode = parse_mode(op, mode_name);
  if (mode_uses_value_norm(mode)) {
    MIXKV_CHECK_VALUE(value_norm.has_value(), op, "mode '", mode_name, "' needs value_norm");
  }
  if (mode_uses_diversity(mode)) {
    MIXKV_CHECK_VALUE(diversity.has_value(), op, "mode '", mode_name, "' needs diversity");
  }
  if (mode_uses_redundancy(mode)) {
    MIXKV_CHECK_VALUE(redundancy.has_value(), op, "mode 'mixkv' needs redundancy");
  }
  if (value_norm) check_scores(op, "value_norm", *value_norm, importance, "importance");
  if (diversity) check_scores(op, "diversity", *diversity, importance, "importance");
  if (redundancy) {
    const at::Tensor& r = *redundancy;
    check_kv_dtype(op, "redundancy", r);
    check_same_device(op, "redundancy", r, importance, "importance");
    MIXKV_CHECK_VALUE(r.dim() == 2 && r.sym_size(0) == importance.sym_size(0) &&
                          r.sym_size(1) == importance.sym_size(1),
                      op, "redundancy must be [B, Hkv] = [", importance.sym_size(0), ", ",
                      importance.sym_size(1), "], got ", r.sym_sizes());
  }
  check_candidate_mask(op, key_mask, importance);
  return importance.sym_sizes().vec();
}

Shape head_budgets_shape(const at::Tensor& importance, int64_t capacity, c10::string_view policy_name,
                         double floor_alpha, const OptTensor& key_mask, int64_t layer,
                         int64_t num_layers, int64_t pyramid_beta, const OptTensor& profile) {
  const char* op = "head_budgets";
  check_rank(op, "importance", importance, 3, "[B, Hkv, C]");
  check_kv_dtype(op, "importance", importance);
  MIXKV_CHECK_VALUE(capacity >= 0, op, "capacity must be >= 0, got ", capacity);
  const Policy policy = parse_policy(op, policy_name);
  MIXKV_CHECK_VALUE(floor_alpha >= 0.0 && floor_alpha <= 1.0, op,
                    "floor_alpha must be in [0, 1], got ", floor_alpha);
  MIXKV_CHECK_VALUE(num_layers >= 1, op, "num_layers must be >= 1, got ", num_layers);
  MIXKV_CHECK_VALUE(layer >= 0 && layer < num_layers, op, "layer must be in [0, num_layers = ",
                    num_layers, "), got ", layer);
  MIXKV_CHECK_VALUE(pyramid_beta >= 1, op, "pyramid_beta must be >= 1, got ", pyramid_beta);
  if (policy == Policy::Explicit) {
    MIXKV_CHECK_VALUE(profile.has_value(), op, "policy 'explicit' needs profile [L, Hkv]");
  }
  if (profile) {
    const at::Tensor& p = *profile;
    MIXKV_CHECK_VALUE(p.dim() == 2 && p.sym_size(0) == num_layers &&
                          p.sym_size(1) == importance.sym_size(1),
                      op, "profile must be [num_layers, Hkv] = [", num_layers, ", ",
                      importance.sym_size(1), "], got ", p.sym_sizes());
    MIXKV_CHECK_TYPE(p.scalar_type() != at::kBool && !at::isComplexType(p.scalar_type()), op,
                     "profile must be real numbers, got ", p.scalar_type());
  }
  check_candidate_mask(op, key_mask, importance);
  return {importance.sym_size(0), importance.sym_size(1)};
}

Shape select_kv_shape(const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
                      int64_t capacity, int64_t window, const OptTensor& key_mask) {
  const char* op = "select_kv";
  MIXKV_CHECK_VALUE(capacity >= 0, op, "capacity must be >= 0, got ", capacity);
  check_scores_for_kv(op, scores, keys, values, window, key_mask);
  const SymInt C = keys.sym_size(2) - window;
  const SymInt kept = (C < capacity ? C : SymInt(capacity)) + window;
  return {keys.sym_size(0), keys.sym_size(1), kept, keys.sym_size(3)};
}

void select_kv_ragged_check(const at::Tensor& scores, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& capacity, int64_t window,
                            const OptTensor& key_mask) {
  const char* op = "select_kv_ragged";
  check_scores_for_kv(op, scores, keys, values, window, key_mask);
  check_head_table(op, "capacity", capacity, keys.sym_size(0), keys.sym_size(1), keys, "keys");
}

SymInt compress_check(const char* op, const at::Tensor& q_window, const at::Tensor& keys,
                      const at::Tensor& values, const OptTensor& key_mask, int64_t budget,
                      int64_t window, c10::string_view mode_name, const OptTensor& redundancy,
                      int64_t pool_kernel, c10::string_view pooling, c10::string_view gqa_reduce) {
  check_rank(op, "q_window", q_window, 4, "[B, Hq, W, D]");
  MIXKV_CHECK_VALUE(q_window.size(2) == window, op, "window (", window,
                    ") must equal the number of window queries q_window.size(2) = ",
                    q_window.size(2));
  MIXKV_CHECK_VALUE(budget > window, op, "budget (", budget,
                    ") must be larger than window (", window, "): the budget counts the window");
  check_kv(op, "keys", keys, window);
  check_values_like_keys(op, values, keys);
  const Mode mode = parse_mode(op, mode_name);
  if (redundancy) {
    const at::Tensor& r = *redundancy;
    MIXKV_CHECK_VALUE(mode_uses_redundancy(mode), op, "redundancy is only used by mode 'mixkv', not '",
                      mode_name, "'");
    check_same_device(op, "redundancy", r, keys, "keys");
    MIXKV_CHECK_VALUE(r.dim() == 2 && r.sym_size(0) == keys.sym_size(0) &&
                          r.sym_size(1) == keys.sym_size(1),
                      op, "redundancy must be [B, Hkv] = [", keys.sym_size(0), ", ",
                      keys.sym_size(1), "], got ", r.sym_sizes());
    check_kv_dtype(op, "redundancy", r);
  }
  check_importance_args(op, q_window, keys, key_mask, pool_kernel, pooling, gqa_reduce);
  return keys.sym_size(2) - window;
}

Shape compress_shape(const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
                     const OptTensor& key_mask, int64_t budget, int64_t window,
                     c10::string_view mode, const OptTensor& redundancy, int64_t pool_kernel,
                     c10::string_view pooling, c10::string_view gqa_reduce) {
  const SymInt C = compress_check("compress", q_window, keys, values, key_mask, budget, window,
                                  mode, redundancy, pool_kernel, pooling, gqa_reduce);
  const int64_t capacity = budget - window;
  const SymInt kept = (C < capacity ? C : SymInt(capacity)) + window;
  return {keys.sym_size(0), keys.sym_size(1), kept, keys.sym_size(3)};
}

Shape ragged_attention_shape(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& starts,
                             const at::Tensor& lengths, const OptTensor& valid) {
  const char* op = "ragged_attention";
  check_rank(op, "query", query, 4, "[B, Hq, q, D]");
  check_kv_dtype(op, "query", query);
  check_rank(op, "keys", keys, 2, "[S, D]");
  check_same_dtype(op, "keys", keys, query, "query");
  check_same_device(op, "keys", keys, query, "query");
  check_values_like_keys(op, values, keys);
  const SymInt &B = query.sym_size(0), &Hq = query.sym_size(1), &D = query.sym_size(3);
  MIXKV_CHECK_VALUE(keys.sym_size(1) == D, op, "keys head dim ", keys.sym_size(1),
                    " differs from query head dim D = ", D);
  check_rank(op, "starts", starts, 2, "[B, Hkv]");
  const SymInt& Hkv = starts.sym_size(1);
  check_head_table(op, "starts", starts, B, Hkv, query, "query");
  check_head_table(op, "lengths", lengths, B, Hkv, query, "query");
  MIXKV_CHECK_VALUE(Hkv > 0 && Hq > 0 && Hq % Hkv == 0, op, "query heads Hq = ", Hq,
                    " must be a positive multiple of the KV heads Hkv = starts.size(1) = ", Hkv);
  if (valid) {
    const at::Tensor& m = *valid;
    MIXKV_CHECK_VALUE(m.dim() == 1 && m.sym_size(0) == keys.sym_size(0), op,
                      "valid must be [S] = [", keys.sym_size(0), "], got ", m.sym_sizes());
    MIXKV_CHECK_TYPE(m.scalar_type() == at::kBool, op, "valid must be bool, got ",
                     m.scalar_type());
    check_same_device(op, "valid", m, query, "query");
  }
  return {B, query.sym_size(2), Hq, D};
}

}  // namespace mixkv

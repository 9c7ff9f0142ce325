// GoogleTest suite of the mixkv op library (CPU and Meta kernels), run by ctest.
//
// Every op is called through the dispatcher (the way torch.ops.mixkv calls it), so these tests
// also check the schemas in csrc/registration.cpp against the kernels' C++ signatures. The
// expected values are computed by hand (see the comments next to each case; docs/design.md
// section 4 is the spec). One test calls mixkv::cpu directly, which also makes the binary depend on
// libmixkv_ops, whose static initialisers register the ops.
#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include "cpu/kernels.h"

namespace {

using at::Tensor;
using OptT = std::optional<at::Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Str = c10::string_view;
const std::nullopt_t none = std::nullopt;

// ---------------------------------------------------------------------------------------------
// The ops, as typed dispatcher handles (signatures follow the schemas in registration.cpp).

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor window_importance(const Tensor& q, const Tensor& k, const OptT& mask = none,
                         int64_t pool_kernel = 5, Str pooling = "avg", Str gqa_reduce = "mean",
                         std::optional<double> scaling = none) {
  static auto op = handle<Tensor(const Tensor&, const Tensor&, const OptT&, int64_t, Str, Str,
                                 std::optional<double>)>("mixkv::window_importance");
  return op.call(q, k, mask, pool_kernel, pooling, gqa_reduce, scaling);
}

Tensor value_norm(const Tensor& v, int64_t window, const OptT& mask = none) {
  static auto op = handle<Tensor(const Tensor&, int64_t, const OptT&)>("mixkv::value_norm");
  return op.call(v, window, mask);
}

Tensors2 key_diversity(const Tensor& k, int64_t window, const OptT& mask = none) {
  static auto op = handle<Tensors2(const Tensor&, int64_t, const OptT&)>("mixkv::key_diversity");
  return op.call(k, window, mask);
}

Tensor mix_scores(const Tensor& a, const OptT& v, const OptT& d, const OptT& r,
                  Str mode = "mixkv", const OptT& mask = none) {
  static auto op = handle<Tensor(const Tensor&, const OptT&, const OptT&, const OptT&, Str,
                                 const OptT&)>("mixkv::mix_scores");
  return op.call(a, v, d, r, mode, mask);
}

Tensor head_budgets(const Tensor& a, int64_t capacity, Str policy = "adaptive",
                    double floor_alpha = 0.2, bool normalize = true, const OptT& mask = none,
                    int64_t layer = 0, int64_t num_layers = 1, int64_t beta = 20,
                    const OptT& profile = none) {
  static auto op = handle<Tensor(const Tensor&, int64_t, Str, double, bool, const OptT&, int64_t,
                                 int64_t, int64_t, const OptT&)>("mixkv::head_budgets");
  return op.call(a, capacity, policy, floor_alpha, normalize, mask, layer, num_layers, beta,
                 profile);
}

Tensors3 select_kv(const Tensor& s, const Tensor& k, const Tensor& v, int64_t capacity,
                   int64_t window, const OptT& mask = none) {
  static auto op = handle<Tensors3(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                   const OptT&)>("mixkv::select_kv");
  return op.call(s, k, v, capacity, window, mask);
}

Tensors4 select_kv_ragged(const Tensor& s, const Tensor& k, const Tensor& v,
                          const Tensor& capacity, int64_t window, const OptT& mask = none) {
  static auto op = handle<Tensors4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   int64_t, const OptT&)>("mixkv::select_kv_ragged");
  return op.call(s, k, v, capacity, window, mask);
}

Tensors3 compress(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& mask,
                  int64_t budget, int64_t window, Str mode = "mixkv", const OptT& red = none,
                  int64_t pool_kernel = 5, Str pooling = "avg", Str gqa_reduce = "mean",
                  std::optional<double> scaling = none) {
  static auto op = handle<Tensors3(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                   int64_t, int64_t, Str, const OptT&, int64_t, Str, Str,
                                   std::optional<double>)>("mixkv::compress");
  return op.call(q, k, v, mask, budget, window, mode, red, pool_kernel, pooling, gqa_reduce,
                 scaling);
}

Tensors4 compress_ragged(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& mask,
                         int64_t budget, int64_t window, Str mode = "mixkv",
                         Str policy = "adaptive", int64_t layer = 0, int64_t num_layers = 1) {
  static auto op = handle<Tensors4(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                   int64_t, int64_t, Str, const OptT&, int64_t, Str, Str,
                                   std::optional<double>, Str, double, bool, int64_t, int64_t,
                                   int64_t, const OptT&)>("mixkv::compress_ragged");
  return op.call(q, k, v, mask, budget, window, mode, none, 5, "avg", "mean", none, policy, 0.2,
                 true, layer, num_layers, 20, none);
}

Tensor ragged_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& starts,
                        const Tensor& lengths, const OptT& valid = none,
                        std::optional<double> scaling = none) {
  static auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const OptT&, std::optional<double>)>(
      "mixkv::ragged_attention");
  return op.call(q, k, v, starts, lengths, valid, scaling);
}

// ---------------------------------------------------------------------------------------------
// Helpers.

const auto kF = at::TensorOptions().dtype(at::kFloat);
const auto kMeta = at::TensorOptions().dtype(at::kFloat).device(at::kMeta);

// A float32 CPU tensor from values (row-major) and a shape.
Tensor T(std::vector<float> data, at::IntArrayRef shape) {
  return at::tensor(at::ArrayRef<float>(data), kF).reshape(shape).clone();
}
Tensor I32(std::vector<int32_t> data, at::IntArrayRef shape) {
  return at::tensor(at::ArrayRef<int32_t>(data), at::TensorOptions().dtype(at::kInt))
      .reshape(shape)
      .clone();
}
Tensor Mask(std::vector<int> data, at::IntArrayRef shape) {
  std::vector<int32_t> d(data.begin(), data.end());
  return I32(d, shape).to(at::kBool);
}

std::vector<float> F(const Tensor& t) {
  const Tensor c = t.to(at::kFloat).contiguous();
  return {c.data_ptr<float>(), c.data_ptr<float>() + c.numel()};
}
std::vector<int64_t> Ints(const Tensor& t) {
  const Tensor c = t.to(at::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}
std::vector<int64_t> Sizes(const Tensor& t) { return t.sizes().vec(); }

void ExpectNear(const Tensor& got, std::vector<float> want, float tol = 1e-6f) {
  const std::vector<float> g = F(got);
  ASSERT_EQ(g.size(), want.size());
  for (size_t i = 0; i < g.size(); ++i) {
    EXPECT_NEAR(g[i], want[i], tol) << "at flat index " << i;
  }
}

// Runs f, expects a c10::Error whose message contains every needle; returns the message.
std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected a c10::Error, got std::exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected a c10::Error, nothing was thrown";
  return "";
}

void ExpectError(const std::function<void()>& f, std::initializer_list<std::string_view> needles) {
  const std::string msg = ErrorOf(f);
  for (std::string_view n : needles) {
    EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "':\n" << msg;
  }
}

// The error messages start with "mixkv::<op>: ".
void ExpectOpError(const std::function<void()>& f, const std::string& op,
                   std::initializer_list<std::string_view> needles) {
  const std::string msg = ErrorOf(f);
  EXPECT_EQ(msg.rfind("mixkv::" + op + ": ", 0), 0u) << "message does not start with 'mixkv::"
                                                     << op << ": ':\n" << msg;
  for (std::string_view n : needles) {
    EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "':\n" << msg;
  }
}

Tensor Randn(at::IntArrayRef shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, kF);
}

// ---------------------------------------------------------------------------------------------
// Registration.

TEST(Registration, AllSchemasAndKernelsPresent) {
  const char* ops[] = {"window_importance", "value_norm",       "key_diversity",
                       "mix_scores",        "head_budgets",     "select_kv",
                       "select_kv_ragged",  "compress",         "compress_ragged",
                       "ragged_attention"};
  for (const char* name : ops) {
    const std::string full = std::string("mixkv::") + name;
    auto h = c10::Dispatcher::singleton().findSchema({full.c_str(), ""});
    ASSERT_TRUE(h.has_value()) << full << " is not registered";
    EXPECT_TRUE(h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) << full << " has no CPU kernel";
  }
  // The ragged ops' output sizes depend on data: their fake kernels live in Python.
  const char* meta_ops[] = {"window_importance", "value_norm", "key_diversity", "mix_scores",
                            "head_budgets",      "select_kv",  "compress",
                            "ragged_attention"};
  for (const char* name : meta_ops) {
    const std::string full = std::string("mixkv::") + name;
    auto h = c10::Dispatcher::singleton().findSchema({full.c_str(), ""});
    ASSERT_TRUE(h.has_value());
    EXPECT_TRUE(h->hasKernelForDispatchKey(c10::DispatchKey::Meta)) << full << " has no Meta kernel";
  }
}

TEST(Registration, DispatcherMatchesDirectCpuCall) {
  const Tensor v = Randn({2, 3, 9, 4}, 1);
  const Tensor via_dispatcher = value_norm(v, 3);
  const Tensor direct = mixkv::cpu::value_norm(v, 3, std::nullopt);
  EXPECT_TRUE(at::equal(via_dispatcher, direct));
}

// ---------------------------------------------------------------------------------------------
// value_norm

TEST(ValueNorm, PythagoreanTriples) {
  // N = 4, W = 1: candidates are rows 0..2; the window row (huge) is not scored.
  const Tensor v = T({3, 4, 6, 8, 5, 12, 100, 100}, {1, 1, 4, 2});
  const Tensor n = value_norm(v, 1);
  EXPECT_EQ(Sizes(n), (std::vector<int64_t>{1, 1, 3}));
  EXPECT_EQ(n.scalar_type(), at::kFloat);
  ExpectNear(n, {5, 10, 13});
}

TEST(ValueNorm, ThreeDimensionalAndHeads) {
  // D = 3: |(1,2,2)| = 3, |(2,3,6)| = 7; two heads, two batch rows (scaled by 1, 2, 3, 4).
  std::vector<float> data;
  for (int bh = 1; bh <= 4; ++bh) {
    for (float x : {1.f, 2.f, 2.f, 2.f, 3.f, 6.f, 0.f, 0.f, 0.f}) data.push_back(x * bh);
  }
  const Tensor n = value_norm(T(data, {2, 2, 3, 3}), 1);
  ExpectNear(n, {3, 7, 6, 14, 9, 21, 12, 28}, 1e-5f);
}

TEST(ValueNorm, HalfAndBFloat16AccumulateToFloat32) {
  const Tensor v = T({3, 4, 6, 8, 1, 1}, {1, 1, 3, 2});
  for (auto dt : {at::kHalf, at::kBFloat16}) {
    const Tensor n = value_norm(v.to(dt), 1);
    EXPECT_EQ(n.scalar_type(), at::kFloat);
    ExpectNear(n, {5, 10});
  }
}

TEST(ValueNorm, PaddedCandidatesAreZero) {
  const Tensor v = T({3, 4, 6, 8, 5, 12, 1, 1}, {1, 1, 4, 2});
  ExpectNear(value_norm(v, 1, Mask({0, 1, 1, 1}, {1, 4})), {0, 10, 13});
  // An integer mask works too (nonzero = real).
  ExpectNear(value_norm(v, 1, I32({0, 0, 7, 1}, {1, 4})), {0, 0, 13});
}

TEST(ValueNorm, NonContiguousInput) {
  // values given as a transposed view: [1, 1, N, D] from a [1, 1, D, N] tensor.
  const Tensor base = T({3, 6, 5, 0, 4, 8, 12, 0}, {1, 1, 2, 4});
  const Tensor v = base.transpose(2, 3);
  ASSERT_FALSE(v.is_contiguous());
  ExpectNear(value_norm(v, 1), {5, 10, 13});
}

// ---------------------------------------------------------------------------------------------
// key_diversity

TEST(KeyDiversity, IdenticalKeysAreFullyRedundant) {
  // Three copies of direction (1, 0), any length: m = (1, 0), r = (3 * 1 - 1) / 2 = 1,
  // diversity = -cos = -1.
  auto [div, red] = key_diversity(T({1, 0, 2, 0, 5, 0}, {1, 1, 3, 2}), 1);
  EXPECT_EQ(Sizes(div), (std::vector<int64_t>{1, 1, 2}));
  EXPECT_EQ(Sizes(red), (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(div.scalar_type(), at::kFloat);
  EXPECT_EQ(red.scalar_type(), at::kFloat);
  ExpectNear(div, {-1, -1});
  ExpectNear(red, {1});
}

TEST(KeyDiversity, OppositeKeysClipToZero) {
  // (1,0) and (-1,0): m = 0, r = (2 * 0 - 1) / 1 = -1 -> clipped to 0; diversity = 0.
  auto [div, red] = key_diversity(T({1, 0, -3, 0}, {1, 1, 2, 2}), 1);
  ExpectNear(div, {0});
  ExpectNear(red, {0});
}

TEST(KeyDiversity, OrthogonalAndMixedKeys) {
  // Orthogonal (2,0), (0,3): unit keys e1, e2; m = (1/2, 1/2); r = (2 * 1/2 - 1) / 1 = 0;
  // diversity of key 0 = -(1/2).
  {
    auto [div, red] = key_diversity(T({2, 0, 0, 3}, {1, 1, 2, 2}), 1);
    ExpectNear(div, {-0.5f});
    ExpectNear(red, {0});
  }
  // (3,0), (0,5), (7,0): unit e1, e2, e1; m = (2/3, 1/3); |m|^2 = 5/9;
  // r = (3 * 5/9 - 1) / 2 = 1/3 (= mean of the pairwise cosines 0, 1, 0);
  // diversity = -(2/3), -(1/3) for the two candidates (W = 1).
  {
    auto [div, red] = key_diversity(T({3, 0, 0, 5, 7, 0}, {1, 1, 3, 2}), 1);
    ExpectNear(div, {-2.f / 3, -1.f / 3});
    ExpectNear(red, {1.f / 3});
  }
  // 45 degrees: (1,0), (1,1): cos = 1/sqrt2; r = 1/sqrt2;
  // m = ((1 + s)/2, s/2), s = 1/sqrt2; diversity_0 = -(1 + s)/2.
  {
    const float s = 1.f / std::sqrt(2.f);
    auto [div, red] = key_diversity(T({1, 0, 1, 1}, {1, 1, 2, 2}), 1);
    ExpectNear(div, {-(1 + s) / 2}, 1e-6f);
    ExpectNear(red, {s}, 1e-6f);
  }
}

TEST(KeyDiversity, MaskExcludesPaddingFromStatistics) {
  // Token 0 is padding: it would have made the keys redundant; only e1 (pos 1) and e2 (pos 2)
  // count -> r = 0, m = (1/2, 1/2); diversity = [0 (padded), -1/2].
  const Tensor k = T({1, 0, 1, 0, 0, 1}, {1, 1, 3, 2});
  auto [div, red] = key_diversity(k, 1, Mask({0, 1, 1}, {1, 3}));
  ExpectNear(div, {0, -0.5f});
  ExpectNear(red, {0});
  // A single real token: r = 0 (n < 2).
  auto [div1, red1] = key_diversity(k, 1, Mask({0, 0, 1}, {1, 3}));
  ExpectNear(red1, {0});
  ExpectNear(div1, {0, 0});
}

TEST(KeyDiversity, ZeroKeyGivesNoNaN) {
  // A zero key has unit vector 0 (norm clamped to 1e-12): n = 3, m = (2/3, 0), r = (4/3 - 1)/2.
  auto [div, red] = key_diversity(T({0, 0, 1, 0, 1, 0}, {1, 1, 3, 2}), 1);
  ExpectNear(div, {0, -2.f / 3});
  ExpectNear(red, {1.f / 6});
}

TEST(KeyDiversity, RedundancyIsMeanPairwiseCosine) {
  // Random keys, 2 rows x 3 heads: r against the O(n^2) definition (clipped to [0, 1]), with a
  // positive offset so that r is not clipped.
  const Tensor k = Randn({2, 3, 11, 5}, 7) + 0.7;
  auto [div, red] = key_diversity(k, 3);
  const Tensor unit = k / k.norm(2, -1, true);
  const Tensor cos = at::matmul(unit, unit.transpose(-1, -2));          // [2, 3, 11, 11]
  const double n = 11;
  const Tensor pairwise = (cos.sum({-1, -2}) - n) / (n * (n - 1));
  ExpectNear(red, F(pairwise.clamp(0, 1)), 1e-5f);
  const Tensor m = unit.mean(2, true);                                  // [2, 3, 1, 5]
  const Tensor want = -(unit.narrow(2, 0, 8) * m).sum(-1);
  ExpectNear(div, F(want), 1e-5f);
}

TEST(KeyDiversity, HalfAndBFloat16) {
  const Tensor k = T({3, 0, 0, 5, 7, 0}, {1, 1, 3, 2});
  for (auto dt : {at::kHalf, at::kBFloat16}) {
    auto [div, red] = key_diversity(k.to(dt), 1);
    EXPECT_EQ(div.scalar_type(), at::kFloat);
    ExpectNear(div, {-2.f / 3, -1.f / 3}, 1e-6f);
    ExpectNear(red, {1.f / 3}, 1e-6f);
  }
}

// ---------------------------------------------------------------------------------------------
// window_importance

// keys of one head with D = 1 holding log(x): with q = 1 and scaling 1 the attention weights
// are x / sum(x).
Tensor LogKeys(std::vector<float> x) {
  for (float& v : x) v = std::log(v);
  const int64_t n = static_cast<int64_t>(x.size());
  return T(x, {1, 1, n, 1});
}

TEST(WindowImportance, SoftmaxByHand) {
  // N = 3, W = 1, D = 1: the window query sees e^0, e^log2, e^log5 -> 1/8, 2/8, 5/8;
  // candidates keep 1/8 and 2/8 (no renormalisation). Default scaling 1/sqrt(1) = 1.
  const Tensor q = T({1}, {1, 1, 1, 1});
  const Tensor k = LogKeys({1, 2, 5});
  const Tensor a = window_importance(q, k, none, /*pool_kernel=*/1);
  EXPECT_EQ(Sizes(a), (std::vector<int64_t>{1, 1, 2}));
  EXPECT_EQ(a.scalar_type(), at::kFloat);
  ExpectNear(a, {0.125f, 0.25f});
  // Explicit scaling 2: weights x^2 / sum x^2 = 1/30, 4/30.
  ExpectNear(window_importance(q, k, none, 1, "avg", "mean", 2.0), {1.f / 30, 4.f / 30});
}

TEST(WindowImportance, PoolingByHand) {
  const Tensor q = T({1}, {1, 1, 1, 1});
  const Tensor k = LogKeys({1, 2, 5});
  // avg, k = 3, zero padding counted: (0 + 1/8 + 2/8)/3, (1/8 + 2/8 + 0)/3.
  ExpectNear(window_importance(q, k, none, 3, "avg"), {0.125f, 0.125f});
  // max, k = 3: both see 2/8.
  ExpectNear(window_importance(q, k, none, 3, "max"), {0.25f, 0.25f});
  // Four candidates 1,2,3,4 (+ window 10, sum 20): avg k = 3 ->
  // (0+1+2)/3, (1+2+3)/3, (2+3+4)/3, (3+4+0)/3, all / 20.
  const Tensor k4 = LogKeys({1, 2, 3, 4, 10});
  ExpectNear(window_importance(q, k4, none, 3, "avg"),
             {3.f / 60, 6.f / 60, 9.f / 60, 7.f / 60}, 1e-6f);
  ExpectNear(window_importance(q, k4, none, 3, "max"),
             {2.f / 20, 3.f / 20, 4.f / 20, 4.f / 20}, 1e-6f);
}

TEST(WindowImportance, CausalWindowByHand) {
  // N = 3, W = 2, C = 1. Window query 0 sits at position 1 and sees keys 0, 1 (weights 1, 3):
  // 1/4 on the candidate; query 1 sees 1, 3, 4: 1/8. Mean over the window: 3/16.
  const Tensor q = T({1, 1}, {1, 1, 2, 1});
  const Tensor a = window_importance(q, LogKeys({1, 3, 4}), none, 1);
  ExpectNear(a, {3.f / 16});
}

TEST(WindowImportance, GqaMeanAndMax) {
  // Hq = 2, Hkv = 1. Query head 0 (q = 1): 1/8, 2/8; query head 1 (q = 0): 1/3, 1/3.
  const Tensor q = T({1, 0}, {1, 2, 1, 1});
  const Tensor k = LogKeys({1, 2, 5});
  ExpectNear(window_importance(q, k, none, 1, "avg", "mean"),
             {(1.f / 8 + 1.f / 3) / 2, (2.f / 8 + 1.f / 3) / 2});
  ExpectNear(window_importance(q, k, none, 1, "avg", "max"), {1.f / 3, 1.f / 3});
}

TEST(WindowImportance, GqaGroupsMapToTheirKvHead) {
  // Hq = 4, Hkv = 2 (G = 2): query heads 0, 1 -> KV head 0; 2, 3 -> KV head 1.
  // KV head 0 keys log(1, 2, 5), KV head 1 keys log(1, 1, 2); q = 1 for all heads.
  std::vector<float> kv;
  for (float x : {1.f, 2.f, 5.f, 1.f, 1.f, 2.f}) kv.push_back(std::log(x));
  const Tensor k = T(kv, {1, 2, 3, 1});
  const Tensor q = T({1, 1, 1, 1}, {1, 4, 1, 1});
  ExpectNear(window_importance(q, k, none, 1), {1.f / 8, 2.f / 8, 1.f / 4, 1.f / 4});
}

TEST(WindowImportance, MaskedKeysGetNoAttention) {
  // Key 0 is padding: softmax over keys 1, 2 only -> 2/7, 5/7; the padded candidate scores 0.
  const Tensor q = T({1}, {1, 1, 1, 1});
  ExpectNear(window_importance(q, LogKeys({1, 2, 5}), Mask({0, 1, 1}, {1, 3}), 1),
             {0, 2.f / 7});
}

TEST(WindowImportance, PaddedWindowQueryIsIgnored) {
  // N = 4, W = 2, left padding 1, keys log(1, 1, 3, 4). Candidates 0 (padding) and 1.
  // Query 0 (position 2) sees keys 1, 2 -> 1/4 on candidate 1; query 1 (position 3) sees
  // keys 1, 2, 3 -> 1/8. Mean over the two real queries: 3/16.
  const Tensor q = T({1, 1}, {1, 1, 2, 1});
  ExpectNear(window_importance(q, LogKeys({1, 1, 3, 4}), Mask({0, 1, 1, 1}, {1, 4}), 1),
             {0, 3.f / 16});
  // Left padding 3 (only the last token is real): window query 0 is padding and contributes
  // nothing; candidates are both padded -> zeros, never NaN.
  const Tensor a = window_importance(q, LogKeys({1, 1, 3, 4}), Mask({0, 0, 0, 1}, {1, 4}), 1);
  ExpectNear(a, {0, 0});
}

TEST(WindowImportance, MatchesAtenReferenceOnRandomInput) {
  // B = 2, Hq = 4, Hkv = 2, N = 12, W = 4, D = 8, left padding of 3 in row 1, avg k = 5.
  const int64_t B = 2, Hq = 4, Hkv = 2, N = 12, W = 4, D = 8, C = N - W, G = Hq / Hkv;
  const Tensor q = Randn({B, Hq, W, D}, 3), k = Randn({B, Hkv, N, D}, 4);
  Tensor mask = at::ones({B, N}, at::kBool);
  mask.select(0, 1).narrow(0, 0, 3).fill_(false);
  const Tensor a = window_importance(q, k, mask);

  const Tensor kk = k.repeat_interleave(G, 1);
  Tensor logits = at::matmul(q, kk.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  const Tensor key_pos = at::arange(N, at::kLong), query_pos = at::arange(C, N, at::kLong);
  const Tensor visible = key_pos.unsqueeze(0).le(query_pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0)
                             .logical_and(mask.unsqueeze(1).unsqueeze(1));
  logits = logits.masked_fill(visible.logical_not(), -std::numeric_limits<float>::infinity());
  const Tensor probs = at::softmax(logits, -1);
  const Tensor per_head = probs.narrow(-1, 0, C).mean(2);                 // [B, Hq, C]
  const Tensor reduced = per_head.view({B, Hkv, G, C}).mean(2);
  Tensor pooled = at::avg_pool1d(reduced.reshape({B * Hkv, 1, C}), {5}, {1}, {2}, false, true)
                      .view({B, Hkv, C});
  pooled = pooled * mask.narrow(1, 0, C).unsqueeze(1).to(at::kFloat);
  ExpectNear(a, F(pooled), 1e-5f);
}

// ---------------------------------------------------------------------------------------------
// mix_scores. Hand case: A = [.1, .2, .3] (mean .2), value norms [1, 2, 3] -> min-max [0, .5, 1]
// (mean .5) -> x .2/.5 -> V~ = [0, .2, .4]; diversity [3, 2, 1] -> [1, .5, 0] -> D~ = [.4, .2, 0].

struct MixCase {
  Tensor A = T({0.1f, 0.2f, 0.3f}, {1, 1, 3});
  Tensor V = T({1, 2, 3}, {1, 1, 3});
  Tensor Dv = T({3, 2, 1}, {1, 1, 3});
};

TEST(MixScores, AttnIsImportance) {
  MixCase c;
  const Tensor s = mix_scores(c.A, none, none, none, "attn");
  EXPECT_EQ(s.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(s, c.A));
  // Unused statistics do not change "attn".
  EXPECT_TRUE(at::equal(mix_scores(c.A, c.V, c.Dv, T({0.7f}, {1, 1}), "attn"), c.A));
}

TEST(MixScores, ModesByHand) {
  MixCase c;
  ExpectNear(mix_scores(c.A, c.V, none, none, "vnorm"), {0.1f, 0.4f, 0.7f});
  ExpectNear(mix_scores(c.A, none, c.Dv, none, "keydiff"), {0.4f, 0.2f, 0.0f});
  ExpectNear(mix_scores(c.A, c.V, c.Dv, none, "mix3"),
             {(0.1f + 0.f + 0.4f) / 3, (0.2f + 0.2f + 0.2f) / 3, (0.3f + 0.4f + 0.f) / 3});
}

TEST(MixScores, MixKvWithRedundancyZeroIsAPlusVTilde) {
  MixCase c;
  ExpectNear(mix_scores(c.A, c.V, c.Dv, T({0}, {1, 1}), "mixkv"), {0.1f, 0.4f, 0.7f});
  // Constant diversity normalises to 0: r does not matter for the D~ term then.
  ExpectNear(mix_scores(c.A, c.V, T({5, 5, 5}, {1, 1, 3}), T({0}, {1, 1}), "mixkv"),
             {0.1f, 0.4f, 0.7f});
}

TEST(MixScores, MixKvRedundancyOneAndHalf) {
  MixCase c;
  ExpectNear(mix_scores(c.A, c.V, c.Dv, T({1}, {1, 1}), "mixkv"), {0.4f, 0.2f, 0.0f});
  ExpectNear(mix_scores(c.A, c.V, c.Dv, T({0.5f}, {1, 1}), "mixkv"), {0.25f, 0.3f, 0.35f});
}

TEST(MixScores, RedundancyIsPerHead) {
  // Two heads with the same statistics, r = 0 and r = 1.
  MixCase c;
  const Tensor A = at::cat({c.A, c.A}, 1), V = at::cat({c.V, c.V}, 1), Dv = at::cat({c.Dv, c.Dv}, 1);
  ExpectNear(mix_scores(A, V, Dv, T({0, 1}, {1, 2}), "mixkv"),
             {0.1f, 0.4f, 0.7f, 0.4f, 0.2f, 0.0f});
}

TEST(MixScores, MaskedCandidatesAreZeroAndLeaveTheStatistics) {
  // A 4th candidate (position 0) is padding with wild values: it must not move min/max/means.
  const Tensor A = T({9, 0.1f, 0.2f, 0.3f}, {1, 1, 4});
  const Tensor V = T({-50, 1, 2, 3}, {1, 1, 4});
  const Tensor mask = Mask({0, 1, 1, 1, 1}, {1, 5});  // [B, N] with N >= C
  ExpectNear(mix_scores(A, V, none, none, "vnorm", mask), {0, 0.1f, 0.4f, 0.7f});
}

TEST(MixScores, ConstantInputsGiveNoNaN) {
  // All-zero importance and constant value norm: everything is 0, not NaN.
  const Tensor zeros = at::zeros({1, 1, 4}, kF);
  const Tensor s = mix_scores(zeros, T({2, 2, 2, 2}, {1, 1, 4}), T({1, 1, 1, 1}, {1, 1, 4}),
                              T({0.5f}, {1, 1}), "mixkv");
  ExpectNear(s, {0, 0, 0, 0});
  // Varying value norm but zero importance: V~ scaled to mean 0 -> 0.
  ExpectNear(mix_scores(zeros, T({1, 2, 3, 4}, {1, 1, 4}), none, none, "vnorm"), {0, 0, 0, 0});
}

// ---------------------------------------------------------------------------------------------
// head_budgets

TEST(HeadBudgets, UniformGivesEveryHeadC) {
  const Tensor A = at::rand({2, 3, 10}, kF);
  const Tensor caps = head_budgets(A, 4, "uniform");
  EXPECT_EQ(caps.scalar_type(), at::kInt);
  EXPECT_EQ(Sizes(caps), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(Ints(caps), (std::vector<int64_t>{4, 4, 4, 4, 4, 4}));
  // Capacity above the candidate count: every candidate.
  EXPECT_EQ(Ints(head_budgets(A, 50, "uniform")), (std::vector<int64_t>(6, 10)));
  // Masked rows: min(c, real candidates). Row 1 has 3 real candidates.
  Tensor mask = at::ones({2, 12}, at::kBool);
  mask.select(0, 1).narrow(0, 0, 7).fill_(false);
  EXPECT_EQ(Ints(head_budgets(A, 4, "uniform", 0.2, true, mask)),
            (std::vector<int64_t>{4, 4, 4, 3, 3, 3}));
}

TEST(HeadBudgets, PyramidOverFourLayersSumsToFourC) {
  // c = 40, C = 100, beta = 20: lo = 2, hi = 78; the linear schedule 78, 52.67, 27.33, 2 with
  // floor of the running sum -> 78, 52, 28, 2 (sum 160 = 4c).
  const Tensor A = at::rand({1, 2, 100}, kF);
  std::vector<int64_t> per_layer;
  int64_t total = 0;
  for (int64_t l = 0; l < 4; ++l) {
    const auto caps = Ints(head_budgets(A, 40, "pyramid", 0.2, true, none, l, 4, 20));
    ASSERT_EQ(caps.size(), 2u);
    EXPECT_EQ(caps[0], caps[1]);
    per_layer.push_back(caps[0]);
    total += caps[0];
  }
  EXPECT_EQ(total, 160);
  EXPECT_EQ(per_layer, (std::vector<int64_t>{78, 52, 28, 2}));
}

TEST(HeadBudgets, PyramidClampedToCandidates) {
  // c = 40, C = 60: hi = 78 > 60 -> hi = 60, lo = 20: 60, 46, 34, 20 (sum 160).
  const Tensor A = at::rand({1, 1, 60}, kF);
  std::vector<int64_t> per_layer;
  for (int64_t l = 0; l < 4; ++l) {
    per_layer.push_back(Ints(head_budgets(A, 40, "pyramid", 0.2, true, none, l, 4, 20))[0]);
  }
  EXPECT_EQ(per_layer, (std::vector<int64_t>{60, 46, 34, 20}));
  // One layer: just c.
  EXPECT_EQ(Ints(head_budgets(A, 40, "pyramid", 0.2, true, none, 0, 1, 20))[0], 40);
}

TEST(HeadBudgets, PyramidSumsExactlyForManyShapes) {
  const Tensor A = at::rand({1, 1, 97}, kF);
  for (int64_t L : {2, 3, 7, 32}) {
    for (int64_t c : {1, 5, 17, 48, 60}) {
      int64_t total = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t cl = Ints(head_budgets(A, c, "pyramid", 0.2, true, none, l, L, 20))[0];
        EXPECT_GE(cl, 0);
        EXPECT_LE(cl, 97);
        total += cl;
      }
      EXPECT_EQ(total, L * c) << "L = " << L << ", c = " << c;
    }
  }
}

TEST(HeadBudgets, AdaptiveByHand) {
  // Hkv = 2, C = 4, c = 2. Head 0 holds all the attention: global top-4 are head 0's four
  // candidates -> n = [4, 0]. alpha = 0.5: targets 0.5*2 + 0.5*[4, 0] = [3, 1] -> [3, 1].
  // alpha = 0: [4, 0]. alpha = 1: uniform [2, 2]. normalize does not change the winner here.
  const Tensor A = T({0.4f, 0.3f, 0.2f, 0.1f, 0.01f, 0.01f, 0.01f, 0.01f}, {1, 2, 4});
  for (bool normalize : {false, true}) {
    EXPECT_EQ(Ints(head_budgets(A, 2, "adaptive", 0.5, normalize)), (std::vector<int64_t>{3, 1}));
    EXPECT_EQ(Ints(head_budgets(A, 2, "adaptive", 0.0, normalize)), (std::vector<int64_t>{4, 0}));
    EXPECT_EQ(Ints(head_budgets(A, 2, "adaptive", 1.0, normalize)), (std::vector<int64_t>{2, 2}));
  }
  // alpha = 0.2: targets [3.6, 0.4] -> floors [3, 0], the leftover goes to head 0 -> [4, 0].
  EXPECT_EQ(Ints(head_budgets(A, 2, "adaptive", 0.2)), (std::vector<int64_t>{4, 0}));
}

TEST(HeadBudgets, AdaptiveNormalizeChangesTheShares) {
  // c = 1, C = 2, alpha = 0. Head 0 = [.5, .5] (its top-1 holds 1/2 of its mass), head 1 =
  // [.45, .05] (top-1 holds .9). Unnormalised: global top-2 = .5, .5 (both head 0) -> [2, 0].
  // Normalised: head 0 -> [.25, .25], head 1 -> [.405, .045]: top-2 = .405 (head 1), .25
  // (head 0) -> [1, 1].
  const Tensor A = T({0.5f, 0.5f, 0.45f, 0.05f}, {1, 2, 2});
  EXPECT_EQ(Ints(head_budgets(A, 1, "adaptive", 0.0, false)), (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(Ints(head_budgets(A, 1, "adaptive", 0.0, true)), (std::vector<int64_t>{1, 1}));
}

TEST(HeadBudgets, AdaptiveSumsExactlyAndRespectsCaps) {
  const Tensor A = at::rand({3, 8, 33}, at::make_generator<at::CPUGeneratorImpl>(11), kF).pow(4);
  for (int64_t c : {0, 1, 7, 20, 33, 40}) {
    for (double alpha : {0.0, 0.2, 1.0}) {
      const auto caps = Ints(head_budgets(A, c, "adaptive", alpha));
      for (int64_t b = 0; b < 3; ++b) {
        int64_t sum = 0;
        for (int64_t h = 0; h < 8; ++h) {
          EXPECT_GE(caps[b * 8 + h], 0);
          EXPECT_LE(caps[b * 8 + h], 33);
          sum += caps[b * 8 + h];
        }
        EXPECT_EQ(sum, 8 * std::min<int64_t>(c, 33)) << "c = " << c << ", alpha = " << alpha;
      }
    }
  }
}

TEST(HeadBudgets, ExplicitProfile) {
  const Tensor A = at::rand({1, 2, 4}, kF);
  // Weights 3:1 of Hkv * c = 4 -> [3, 1]; profile row chosen by layer.
  const Tensor profile = T({1, 1, 3, 1}, {2, 2});
  EXPECT_EQ(Ints(head_budgets(A, 2, "explicit", 0.2, true, none, 1, 2, 20, profile)),
            (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(Ints(head_budgets(A, 2, "explicit", 0.2, true, none, 0, 2, 20, profile)),
            (std::vector<int64_t>{2, 2}));
  // Water-filling: weights [1, 0], c = 2, C = 3: head 0 capped at 3, the rest (1) to head 1.
  const Tensor A3 = at::rand({1, 2, 3}, kF);
  EXPECT_EQ(Ints(head_budgets(A3, 2, "explicit", 0.2, true, none, 0, 1, 20, T({1, 0}, {1, 2}))),
            (std::vector<int64_t>{3, 1}));
}

// ---------------------------------------------------------------------------------------------
// select_kv / select_kv_ragged. Keys of position j are (j, -j), values (10 j, 100 j), so the
// gathered rows reveal the positions.

Tensor PositionKeys(int64_t B, int64_t H, int64_t N, float scale_a = 1, float scale_b = -1) {
  const Tensor pos = at::arange(N, kF).view({1, 1, N, 1}).expand({B, H, N, 1});
  return at::cat({pos * scale_a, pos * scale_b}, -1).contiguous();
}

void ExpectGathered(const Tensor& kept_k, const Tensor& kept_v, const Tensor& idx) {
  // kept rows must be the rows of the positions in idx.
  const Tensor pos = idx.to(at::kFloat).unsqueeze(-1);
  ExpectNear(kept_k, F(at::cat({pos, -pos}, -1)));
  ExpectNear(kept_v, F(at::cat({pos * 10, pos * 100}, -1)));
}

TEST(SelectKv, TopCapacityTiesToLowerPositionThenWindow) {
  // C = 5, W = 2, N = 7, capacity 3: scores [.5, .9, .5, .1, .9] -> .9@1, .9@4, then the
  // .5 tie between 0 and 2 goes to 0 -> kept [0, 1, 4] + window [5, 6].
  const Tensor s = T({0.5f, 0.9f, 0.5f, 0.1f, 0.9f}, {1, 1, 5});
  const Tensor k = PositionKeys(1, 1, 7), v = PositionKeys(1, 1, 7, 10, 100);
  auto [kk, vv, idx] = select_kv(s, k, v, 3, 2);
  EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{1, 1, 5, 2}));
  EXPECT_EQ(Sizes(vv), (std::vector<int64_t>{1, 1, 5, 2}));
  EXPECT_EQ(Sizes(idx), (std::vector<int64_t>{1, 1, 5}));
  EXPECT_EQ(idx.scalar_type(), at::kInt);
  EXPECT_EQ(kk.scalar_type(), at::kFloat);
  EXPECT_EQ(Ints(idx), (std::vector<int64_t>{0, 1, 4, 5, 6}));
  ExpectGathered(kk, vv, idx);
  // capacity 1: the .9 tie between 1 and 4 goes to 1.
  EXPECT_EQ(Ints(std::get<2>(select_kv(s, k, v, 1, 2))), (std::vector<int64_t>{1, 5, 6}));
  // capacity 4: 0, 1, 2, 4.
  EXPECT_EQ(Ints(std::get<2>(select_kv(s, k, v, 4, 2))), (std::vector<int64_t>{0, 1, 2, 4, 5, 6}));
}

TEST(SelectKv, AllTiedKeepsTheFirstPositions) {
  const Tensor s = at::zeros({1, 1, 6}, kF);
  const Tensor k = PositionKeys(1, 1, 8), v = PositionKeys(1, 1, 8, 10, 100);
  EXPECT_EQ(Ints(std::get<2>(select_kv(s, k, v, 3, 2))), (std::vector<int64_t>{0, 1, 2, 6, 7}));
}

TEST(SelectKv, CapacityZeroKeepsOnlyTheWindow) {
  const Tensor s = T({3, 2, 1}, {1, 1, 3});
  const Tensor k = PositionKeys(1, 1, 5), v = PositionKeys(1, 1, 5, 10, 100);
  auto [kk, vv, idx] = select_kv(s, k, v, 0, 2);
  EXPECT_EQ(Ints(idx), (std::vector<int64_t>{3, 4}));
  ExpectGathered(kk, vv, idx);
}

TEST(SelectKv, CapacityAboveCandidatesKeepsEverything) {
  const Tensor s = T({3, 2, 1}, {1, 1, 3});
  const Tensor k = PositionKeys(1, 1, 5), v = PositionKeys(1, 1, 5, 10, 100);
  auto [kk, vv, idx] = select_kv(s, k, v, 10, 2);
  EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{1, 1, 5, 2}));
  EXPECT_EQ(Ints(idx), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_TRUE(at::equal(kk, k));
  EXPECT_TRUE(at::equal(vv, v));
}

TEST(SelectKv, PerRowAndHeadAndHalfDtype) {
  // B = 2, Hkv = 2, C = 4, W = 1, capacity 2: each (b, h) picks its own top-2.
  const Tensor s = T({4, 3, 2, 1,   // (0,0) -> 0, 1
                      1, 2, 3, 4,   // (0,1) -> 2, 3
                      1, 9, 1, 9,   // (1,0) -> 1, 3
                      7, 1, 1, 7},  // (1,1) -> 0, 3
                     {2, 2, 4});
  const Tensor k = PositionKeys(2, 2, 5), v = PositionKeys(2, 2, 5, 10, 100);
  auto [kk, vv, idx] = select_kv(s, k.to(at::kHalf), v.to(at::kHalf), 2, 1);
  EXPECT_EQ(kk.scalar_type(), at::kHalf);
  EXPECT_EQ(vv.scalar_type(), at::kHalf);
  EXPECT_EQ(Ints(idx), (std::vector<int64_t>{0, 1, 4, 2, 3, 4, 1, 3, 4, 0, 3, 4}));
  ExpectGathered(kk, vv, idx);
}

TEST(SelectKv, PaddedCandidatesAreNeverPickedWhenRealOnesSuffice) {
  // Position 0 and 1 are padding with the highest scores; capacity 2 of 3 real candidates.
  const Tensor s = T({9, 9, 0.1f, 0.3f, 0.2f}, {1, 1, 5});
  const Tensor k = PositionKeys(1, 1, 6), v = PositionKeys(1, 1, 6, 10, 100);
  const Tensor mask = Mask({0, 0, 1, 1, 1, 1}, {1, 6});
  EXPECT_EQ(Ints(std::get<2>(select_kv(s, k, v, 2, 1, mask))), (std::vector<int64_t>{3, 4, 5}));
  // Capacity 4 > 3 real candidates: padding is kept last-resort and comes first (left padding
  // stays left), here position 0.
  EXPECT_EQ(Ints(std::get<2>(select_kv(s, k, v, 4, 1, mask))),
            (std::vector<int64_t>{0, 2, 3, 4, 5}));
}

TEST(SelectKvRagged, OffsetsAndSegments) {
  // B = 2, Hkv = 2, C = 3, W = 1 (N = 4); capacities [[2, 0], [5, 1]] -> segment lengths
  // min(c, C) + W = 3, 1, 4, 2 -> offsets [0, 3, 4, 8, 10].
  const Tensor s = T({1, 3, 2,   // (0,0) c=2 -> 1, 2
                      1, 2, 3,   // (0,1) c=0 -> -
                      1, 1, 1,   // (1,0) c=5 -> 0, 1, 2
                      1, 5, 5},  // (1,1) c=1 -> tie 1 vs 2 -> 1
                     {2, 2, 3});
  const Tensor k = PositionKeys(2, 2, 4), v = PositionKeys(2, 2, 4, 10, 100);
  auto [kk, vv, idx, off] = select_kv_ragged(s, k, v, I32({2, 0, 5, 1}, {2, 2}), 1);
  EXPECT_EQ(off.scalar_type(), at::kInt);
  EXPECT_EQ(idx.scalar_type(), at::kInt);
  EXPECT_EQ(Ints(off), (std::vector<int64_t>{0, 3, 4, 8, 10}));
  EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{10, 2}));
  EXPECT_EQ(Sizes(vv), (std::vector<int64_t>{10, 2}));
  EXPECT_EQ(Ints(idx), (std::vector<int64_t>{1, 2, 3, 3, 0, 1, 2, 3, 1, 3}));
  ExpectGathered(kk, vv, idx);
}

TEST(SelectKvRagged, UniformCapacityMatchesSelectKv) {
  const int64_t B = 2, H = 3, N = 17, W = 4, D = 6, C = N - W;
  const Tensor s = Randn({B, H, C}, 21), k = Randn({B, H, N, D}, 22), v = Randn({B, H, N, D}, 23);
  auto [dk, dv, didx] = select_kv(s, k, v, 5, W);
  auto [rk, rv, ridx, off] = select_kv_ragged(s, k, v, at::full({B, H}, 5, at::kInt), W);
  EXPECT_TRUE(at::equal(rk, dk.reshape({-1, D})));
  EXPECT_TRUE(at::equal(rv, dv.reshape({-1, D})));
  EXPECT_TRUE(at::equal(ridx, didx.reshape({-1})));
  EXPECT_EQ(Ints(off), Ints(at::arange(0, B * H + 1, at::kLong) * (5 + W)));
}

// ---------------------------------------------------------------------------------------------
// compress: the fused path equals the composition of the single ops.

TEST(Compress, EqualsComposedOps) {
  const int64_t B = 2, Hq = 4, Hkv = 2, N = 24, W = 4, D = 8, budget = 12;
  const Tensor q = Randn({B, Hq, W, D}, 31), k = Randn({B, Hkv, N, D}, 32),
               v = Randn({B, Hkv, N, D}, 33);
  Tensor mask = at::ones({B, N}, at::kBool);
  mask.select(0, 0).narrow(0, 0, 5).fill_(false);
  for (const char* mode : {"attn", "keydiff", "vnorm", "mix3", "mixkv"}) {
    SCOPED_TRACE(mode);
    const Tensor A = window_importance(q, k, mask);
    const Tensor V = value_norm(v, W, mask);
    auto [Dv, r] = key_diversity(k, W, mask);
    const Tensor S = mix_scores(A, V, Dv, r, mode, mask);
    auto [ek, ev, eidx] = select_kv(S, k, v, budget - W, W, mask);
    auto [ck, cv, cidx] = compress(q, k, v, mask, budget, W, mode);
    EXPECT_TRUE(at::equal(cidx, eidx));
    EXPECT_TRUE(at::equal(ck, ek));
    EXPECT_TRUE(at::equal(cv, ev));
    // Ragged with uniform capacities is the same, flattened.
    auto [rk, rv, ridx, off] = compress_ragged(q, k, v, mask, budget, W, mode, "uniform");
    EXPECT_TRUE(at::equal(ridx, eidx.reshape({-1})));
    EXPECT_TRUE(at::equal(rk, ek.reshape({-1, D})));
  }
}

TEST(Compress, OfflineRedundancyIsUsed) {
  // Redundancy 1 makes mixkv equal to keydiff, 0 makes it vnorm.
  const int64_t B = 1, Hkv = 2, N = 20, W = 4, D = 8;
  const Tensor q = Randn({B, Hkv, W, D}, 41), k = Randn({B, Hkv, N, D}, 42),
               v = Randn({B, Hkv, N, D}, 43);
  auto idx = [&](const char* mode, const OptT& r) {
    return std::get<2>(compress(q, k, v, none, 10, W, mode, r));
  };
  EXPECT_TRUE(at::equal(idx("mixkv", at::ones({B, Hkv}, kF)), idx("keydiff", none)));
  EXPECT_TRUE(at::equal(idx("mixkv", at::zeros({B, Hkv}, kF)), idx("vnorm", none)));
}

TEST(Compress, ShortPromptKeepsEverything) {
  const Tensor q = Randn({1, 2, 4, 8}, 51), k = Randn({1, 2, 10, 8}, 52), v = Randn({1, 2, 10, 8}, 53);
  auto [kk, vv, idx] = compress(q, k, v, none, 16, 4);
  EXPECT_TRUE(at::equal(kk, k));
  EXPECT_TRUE(at::equal(vv, v));
  EXPECT_EQ(Ints(idx.select(1, 1).flatten()), Ints(at::arange(10, at::kLong)));
}

TEST(CompressRagged, AdaptiveSegmentsSumToBudget) {
  const int64_t B = 2, Hkv = 4, N = 40, W = 8, D = 8, budget = 16;
  const Tensor q = Randn({B, 2 * Hkv, W, D}, 61), k = Randn({B, Hkv, N, D}, 62),
               v = Randn({B, Hkv, N, D}, 63);
  auto [kk, vv, idx, off] = compress_ragged(q, k, v, none, budget, W);
  ASSERT_EQ(off.numel(), B * Hkv + 1);
  EXPECT_EQ(Ints(off).back(), B * Hkv * budget);
  EXPECT_EQ(kk.size(0), B * Hkv * budget);
  // Every segment is ascending and ends with the window.
  const auto o = Ints(off), p = Ints(idx);
  for (int64_t s = 0; s < B * Hkv; ++s) {
    ASSERT_GE(o[s + 1] - o[s], W);
    for (int64_t t = o[s] + 1; t < o[s + 1]; ++t) EXPECT_LT(p[t - 1], p[t]);
    for (int64_t w = 0; w < W; ++w) EXPECT_EQ(p[o[s + 1] - W + w], N - W + w);
  }
}

// ---------------------------------------------------------------------------------------------
// Edge cases: no candidates (W == N), a row that is all padding, a pool kernel wider than C.

TEST(EdgeCases, NoCandidates) {
  const Tensor q = Randn({1, 2, 6, 4}, 81), k = Randn({1, 2, 6, 4}, 82), v = Randn({1, 2, 6, 4}, 83);
  const Tensor a = window_importance(q, k);
  EXPECT_EQ(Sizes(a), (std::vector<int64_t>{1, 2, 0}));
  EXPECT_EQ(Sizes(value_norm(v, 6)), (std::vector<int64_t>{1, 2, 0}));
  auto [div, red] = key_diversity(k, 6);
  EXPECT_EQ(Sizes(div), (std::vector<int64_t>{1, 2, 0}));
  EXPECT_EQ(Sizes(red), (std::vector<int64_t>{1, 2}));  // the window still has keys
  EXPECT_EQ(Sizes(mix_scores(a, a, a, red, "mixkv")), (std::vector<int64_t>{1, 2, 0}));
  EXPECT_EQ(Ints(head_budgets(a, 4, "adaptive")), (std::vector<int64_t>{0, 0}));
  auto [kk, vv, idx] = select_kv(a, k, v, 4, 6);
  EXPECT_TRUE(at::equal(kk, k));
  auto [ck, cv, ci] = compress(q, k, v, none, 8, 6);
  EXPECT_TRUE(at::equal(ck, k));
  EXPECT_TRUE(at::equal(cv, v));
}

TEST(EdgeCases, FullyPaddedRowGivesNoNaN) {
  // Row 1 is entirely padding: every statistic is 0, nothing is NaN, shapes stay uniform.
  const int64_t B = 2, H = 2, N = 10, W = 2, D = 4;
  const Tensor q = Randn({B, H, W, D}, 91), k = Randn({B, H, N, D}, 92), v = Randn({B, H, N, D}, 93);
  Tensor mask = at::ones({B, N}, at::kBool);
  mask.select(0, 1).fill_(false);
  const Tensor a = window_importance(q, k, mask);
  const Tensor vn = value_norm(v, W, mask);
  auto [div, red] = key_diversity(k, W, mask);
  const Tensor s = mix_scores(a, vn, div, red, "mixkv", mask);
  for (const Tensor& t : {a, vn, div, red, s}) {
    EXPECT_FALSE(at::isnan(t).any().item<bool>());
    EXPECT_EQ(F(t.select(0, 1).abs().sum())[0], 0.f);
  }
  EXPECT_EQ(Ints(head_budgets(a, 3, "adaptive", 0.2, true, mask)),
            (std::vector<int64_t>{3, 3, 0, 0}));
  auto [kk, vv, idx] = compress(q, k, v, mask, 5, W);
  EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{B, H, 5, D}));
}

TEST(EdgeCases, PoolKernelWiderThanCandidates) {
  // C = 2, k = 7 (padding 3): avg = (1/8 + 2/8)/7 at both; max = 2/8 at both.
  const Tensor q = T({1}, {1, 1, 1, 1});
  ExpectNear(window_importance(q, LogKeys({1, 2, 5}), none, 7, "avg"), {3.f / 56, 3.f / 56});
  ExpectNear(window_importance(q, LogKeys({1, 2, 5}), none, 7, "max"), {0.25f, 0.25f});
}

TEST(EdgeCases, ManyHeadsAcrossThreads) {
  // Enough (row, head) pairs and candidates that parallel_for splits the work: the result
  // must equal the per-head computation.
  const Tensor v = Randn({3, 5, 70, 6}, 101);
  const Tensor n = value_norm(v, 7);
  ExpectNear(n, F(v.narrow(2, 0, 63).norm(2, -1)), 1e-5f);
  for (int64_t b = 0; b < 3; ++b) {
    const Tensor one = value_norm(v.narrow(0, b, 1).narrow(1, 2, 1), 7);
    ExpectNear(one, F(n.narrow(0, b, 1).narrow(1, 2, 1)), 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// ragged_attention

TEST(RaggedAttention, SoftmaxCausalityAndValidByHand) {
  // One KV head, D = 2, scaling 1. The segment is rows 1..2 of a 4-row buffer; the spare rows 0
  // and 3 are huge, so reading them would show. Query (1, 0) gives logits 0 and ln 3 to the two
  // tokens: weights 1/4 and 3/4.
  const float big = 1e6f, ln3 = std::log(3.f);
  const Tensor keys = T({big, big, 0, 0, ln3, 0, big, big}, {4, 2});
  const Tensor values = T({big, big, 4, 8, 0, 4, big, big}, {4, 2});
  const Tensor starts = I32({1}, {1, 1}), lengths = I32({2}, {1, 1});
  // q = 1: the query is token 1 and sees both: 1/4 (4, 8) + 3/4 (0, 4) = (1, 5).
  ExpectNear(ragged_attention(T({1, 0}, {1, 1, 1, 2}), keys, values, starts, lengths, none, 1.0),
             {1, 5}, 1e-5f);
  // q = 2: query 0 is token 0 and sees only itself. The output is [B, q, Hq, D].
  const Tensor q2 = T({1, 0, 1, 0}, {1, 1, 2, 2});
  const Tensor out = ragged_attention(q2, keys, values, starts, lengths, none, 1.0);
  EXPECT_EQ(Sizes(out), (std::vector<int64_t>{1, 2, 1, 2}));
  ExpectNear(out, {4, 8, 1, 5}, 1e-5f);
  // Token 0 (buffer row 1) is padding: query 0 sees nothing (zeros), query 1 only token 1.
  ExpectNear(ragged_attention(q2, keys, values, starts, lengths, Mask({1, 0, 1, 1}, {4}), 1.0),
             {0, 0, 0, 4}, 1e-5f);
}

// ---------------------------------------------------------------------------------------------
// Meta kernels: shapes and dtypes without data.

TEST(Meta, RaggedAttentionShape) {
  const Tensor q = at::empty({2, 8, 3, 16}, kMeta.dtype(at::kBFloat16));
  const Tensor kv = at::empty({40, 16}, kMeta.dtype(at::kBFloat16));
  const Tensor table = at::empty({2, 4}, kMeta.dtype(at::kInt));
  const Tensor out = ragged_attention(q, kv, kv, table, table);
  EXPECT_TRUE(out.is_meta());
  EXPECT_EQ(Sizes(out), (std::vector<int64_t>{2, 3, 8, 16}));
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
}

TEST(Meta, ScoreOpsShapesAndDtypes) {
  const Tensor q = at::empty({2, 8, 4, 16}, kMeta.dtype(at::kHalf));
  const Tensor k = at::empty({2, 4, 30, 16}, kMeta.dtype(at::kHalf));
  const Tensor a = window_importance(q, k);
  EXPECT_TRUE(a.is_meta());
  EXPECT_EQ(Sizes(a), (std::vector<int64_t>{2, 4, 26}));
  EXPECT_EQ(a.scalar_type(), at::kFloat);

  const Tensor vn = value_norm(k, 4);
  EXPECT_TRUE(vn.is_meta());
  EXPECT_EQ(Sizes(vn), (std::vector<int64_t>{2, 4, 26}));
  EXPECT_EQ(vn.scalar_type(), at::kFloat);

  auto [div, red] = key_diversity(k.to(at::kBFloat16), 4, at::empty({2, 30}, kMeta.dtype(at::kBool)));
  EXPECT_EQ(Sizes(div), (std::vector<int64_t>{2, 4, 26}));
  EXPECT_EQ(Sizes(red), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(div.scalar_type(), at::kFloat);
  EXPECT_EQ(red.scalar_type(), at::kFloat);

  const Tensor s = mix_scores(a, vn, div, red, "mixkv");
  EXPECT_TRUE(s.is_meta());
  EXPECT_EQ(Sizes(s), (std::vector<int64_t>{2, 4, 26}));
  EXPECT_EQ(s.scalar_type(), at::kFloat);

  const Tensor caps = head_budgets(a, 8, "adaptive");
  EXPECT_TRUE(caps.is_meta());
  EXPECT_EQ(Sizes(caps), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(caps.scalar_type(), at::kInt);
}

TEST(Meta, SelectKvShapes) {
  const Tensor k = at::empty({2, 3, 20, 8}, kMeta.dtype(at::kBFloat16));
  const Tensor s = at::empty({2, 3, 16}, kMeta);
  {
    auto [kk, vv, idx] = select_kv(s, k, k, 5, 4);
    EXPECT_TRUE(kk.is_meta());
    EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{2, 3, 9, 8}));
    EXPECT_EQ(Sizes(vv), (std::vector<int64_t>{2, 3, 9, 8}));
    EXPECT_EQ(Sizes(idx), (std::vector<int64_t>{2, 3, 9}));
    EXPECT_EQ(kk.scalar_type(), at::kBFloat16);
    EXPECT_EQ(idx.scalar_type(), at::kInt);
  }
  {  // capacity > C: keeps all N.
    auto [kk, vv, idx] = select_kv(s, k, k, 100, 4);
    EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{2, 3, 20, 8}));
    EXPECT_EQ(Sizes(idx), (std::vector<int64_t>{2, 3, 20}));
  }
}

TEST(Meta, CompressShapes) {
  const Tensor q = at::empty({1, 4, 8, 16}, kMeta);
  const Tensor k = at::empty({1, 2, 50, 16}, kMeta);
  {
    auto [kk, vv, idx] = compress(q, k, k, none, 24, 8);
    EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{1, 2, 24, 16}));
    EXPECT_EQ(Sizes(vv), (std::vector<int64_t>{1, 2, 24, 16}));
    EXPECT_EQ(Sizes(idx), (std::vector<int64_t>{1, 2, 24}));
    EXPECT_EQ(idx.scalar_type(), at::kInt);
  }
  {  // N <= budget: all N kept.
    auto [kk, vv, idx] = compress(q, k, k, none, 64, 8);
    EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{1, 2, 50, 16}));
    EXPECT_EQ(Sizes(idx), (std::vector<int64_t>{1, 2, 50}));
  }
  {  // N == budget.
    auto [kk, vv, idx] = compress(q, k, k, none, 50, 8);
    EXPECT_EQ(Sizes(kk), (std::vector<int64_t>{1, 2, 50, 16}));
  }
}

TEST(Meta, MatchesCpuShapes) {
  const Tensor q = Randn({2, 4, 4, 8}, 71), k = Randn({2, 2, 15, 8}, 72), v = Randn({2, 2, 15, 8}, 73);
  auto [ck, cv, ci] = compress(q, k, v, none, 9, 4);
  auto [mk, mv, mi] = compress(q.to(at::kMeta), k.to(at::kMeta), v.to(at::kMeta), none, 9, 4);
  EXPECT_EQ(Sizes(ck), Sizes(mk));
  EXPECT_EQ(Sizes(ci), Sizes(mi));
  EXPECT_EQ(ci.scalar_type(), mi.scalar_type());
}

TEST(Meta, ChecksRunOnMeta) {
  const Tensor k = at::empty({2, 3, 20, 8}, kMeta);
  ExpectOpError([&] { value_norm(k, 21); }, "value_norm", {"window", "21"});
  ExpectOpError([&] { select_kv(at::empty({2, 3, 16}, kMeta), k, k, -1, 4); }, "select_kv",
                {"capacity"});
  ExpectOpError([&] { compress(at::empty({2, 3, 4, 8}, kMeta), k, k, none, 4, 4); }, "compress",
                {"budget"});
}

// ---------------------------------------------------------------------------------------------
// Error messages: "mixkv::<op>: " and the argument's name.

TEST(Errors, WrongRank) {
  const Tensor k2 = at::zeros({2, 3}, kF);
  {
    const std::string msg = ErrorOf([&] { key_diversity(k2, 1); });
    EXPECT_EQ(msg.rfind("mixkv::key_diversity: keys must be [B, Hkv, N, D], got [2, 3]", 0), 0u)
        << msg;
  }
  ExpectOpError([&] { value_norm(k2, 1); }, "value_norm", {"values", "[B, Hkv, N, D]"});
  ExpectOpError([&] { window_importance(at::zeros({1, 1, 4}, kF), at::zeros({1, 1, 8, 4}, kF)); },
                "window_importance", {"q_window", "[B, Hq, W, D]"});
  ExpectOpError([&] { mix_scores(at::zeros({1, 3}, kF), none, none, none, "attn"); },
                "mix_scores", {"importance", "[B, Hkv, C]"});
  ExpectOpError([&] { head_budgets(at::zeros({3}, kF), 1); }, "head_budgets", {"importance"});
  ExpectOpError(
      [&] { select_kv(at::zeros({1, 4}, kF), at::zeros({1, 1, 5, 2}, kF), at::zeros({1, 1, 5, 2}, kF), 1, 1); },
      "select_kv", {"scores"});
  EXPECT_THROW(value_norm(k2, 1), c10::ValueError);
}

TEST(Errors, QueryHeadsNotMultipleOfKvHeads) {
  const Tensor q = at::zeros({1, 3, 2, 4}, kF), k = at::zeros({1, 2, 8, 4}, kF);
  ExpectOpError([&] { window_importance(q, k); }, "window_importance", {"q_window", "Hkv", "3", "2"});
  ExpectOpError([&] { compress(q, k, k, none, 6, 2); }, "compress", {"q_window", "Hkv"});
}

TEST(Errors, WindowLargerThanPrompt) {
  const Tensor k = at::zeros({1, 1, 5, 4}, kF);
  ExpectOpError([&] { value_norm(k, 6); }, "value_norm", {"window", "6", "5"});
  ExpectOpError([&] { key_diversity(k, 6); }, "key_diversity", {"window", "keys"});
  ExpectOpError([&] { window_importance(at::zeros({1, 1, 6, 4}, kF), k); }, "window_importance",
                {"window", "keys"});
  ExpectOpError([&] { value_norm(k, 0); }, "value_norm", {"window"});
}

TEST(Errors, BudgetNotLargerThanWindow) {
  const Tensor q = at::zeros({1, 1, 4, 4}, kF), k = at::zeros({1, 1, 10, 4}, kF);
  ExpectOpError([&] { compress(q, k, k, none, 4, 4); }, "compress", {"budget", "window"});
  ExpectOpError([&] { compress(q, k, k, none, 2, 4); }, "compress", {"budget"});
  ExpectOpError([&] { compress_ragged(q, k, k, none, 4, 4); }, "compress_ragged", {"budget"});
  // window must match the queries.
  ExpectOpError([&] { compress(q, k, k, none, 8, 3); }, "compress", {"window", "q_window"});
}

TEST(Errors, NegativeCapacity) {
  const Tensor s = at::zeros({1, 2, 3}, kF), k = at::zeros({1, 2, 4, 2}, kF);
  ExpectOpError([&] { select_kv(s, k, k, -1, 1); }, "select_kv", {"capacity", "-1"});
  ExpectOpError([&] { head_budgets(s, -3, "uniform"); }, "head_budgets", {"capacity", "-3"});
  ExpectOpError([&] { select_kv_ragged(s, k, k, I32({1, -2}, {1, 2}), 1); }, "select_kv_ragged",
                {"capacity", "-2"});
  // Wrong capacity shape / dtype for the ragged op.
  ExpectOpError([&] { select_kv_ragged(s, k, k, I32({1, 2, 3}, {1, 3}), 1); }, "select_kv_ragged",
                {"capacity"});
  ExpectOpError([&] { select_kv_ragged(s, k, k, at::ones({1, 2}, at::kLong), 1); },
                "select_kv_ragged", {"capacity", "int32"});
}

TEST(Errors, BadStringOptions) {
  const Tensor A = at::zeros({1, 1, 3}, kF);
  ExpectOpError([&] { mix_scores(A, none, none, none, "snapkv"); }, "mix_scores",
                {"mode", "snapkv"});
  const Tensor q = at::zeros({1, 1, 2, 4}, kF), k = at::zeros({1, 1, 8, 4}, kF);
  ExpectOpError([&] { compress(q, k, k, none, 6, 2, "bogus"); }, "compress", {"mode", "bogus"});
  ExpectOpError([&] { window_importance(q, k, none, 5, "min"); }, "window_importance",
                {"pooling", "min"});
  ExpectOpError([&] { window_importance(q, k, none, 5, "avg", "sum"); }, "window_importance",
                {"gqa_reduce", "sum"});
  ExpectOpError([&] { head_budgets(A, 1, "greedy"); }, "head_budgets", {"policy", "greedy"});
}

TEST(Errors, OtherArguments) {
  const Tensor A = at::zeros({1, 2, 3}, kF);
  // mode needs its statistics.
  ExpectOpError([&] { mix_scores(A, none, none, none, "vnorm"); }, "mix_scores", {"value_norm"});
  ExpectOpError([&] { mix_scores(A, A, none, none, "keydiff"); }, "mix_scores", {"diversity"});
  ExpectOpError([&] { mix_scores(A, A, A, none, "mixkv"); }, "mix_scores", {"redundancy"});
  ExpectOpError([&] { mix_scores(A, A, A, at::zeros({1, 3}, kF), "mixkv"); }, "mix_scores",
                {"redundancy", "[1, 2]"});
  ExpectOpError([&] { mix_scores(A, at::zeros({1, 2, 4}, kF), none, none, "vnorm"); },
                "mix_scores", {"value_norm"});
  // Key mask of the wrong shape, and of a float dtype.
  const Tensor k = at::zeros({1, 1, 5, 2}, kF);
  ExpectOpError([&] { value_norm(k, 1, at::ones({1, 4}, at::kBool)); }, "value_norm", {"key_mask"});
  ExpectOpError([&] { value_norm(k, 1, at::ones({1, 5}, kF)); }, "value_norm", {"key_mask"});
  // Unsupported dtype.
  ExpectOpError([&] { value_norm(at::zeros({1, 1, 5, 2}, at::kDouble), 1); }, "value_norm",
                {"values", "float32"});
  // Values unlike keys.
  ExpectOpError([&] { select_kv(at::zeros({1, 1, 4}, kF), k, at::zeros({1, 1, 5, 3}, kF), 1, 1); },
                "select_kv", {"values"});
  // Pool kernel must be odd and positive.
  const Tensor q = at::zeros({1, 1, 1, 2}, kF);
  ExpectOpError([&] { window_importance(q, k, none, 4); }, "window_importance", {"pool_kernel"});
  // head_budgets parameters.
  ExpectOpError([&] { head_budgets(A, 1, "adaptive", 1.5); }, "head_budgets", {"floor_alpha"});
  ExpectOpError([&] { head_budgets(A, 1, "pyramid", 0.2, true, none, 4, 4); }, "head_budgets",
                {"layer"});
  ExpectOpError([&] { head_budgets(A, 1, "explicit"); }, "head_budgets", {"profile"});
}

TEST(Errors, NonFiniteScores) {
  const Tensor k = PositionKeys(1, 1, 4), v = PositionKeys(1, 1, 4, 10, 100);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  ExpectOpError([&] { select_kv(T({1, nan, 2}, {1, 1, 3}), k, v, 1, 1); }, "select_kv",
                {"scores", "finite"});
  ExpectOpError([&] { select_kv(T({1, inf, 2}, {1, 1, 3}), k, v, 1, 1); }, "select_kv",
                {"scores", "finite"});
  ExpectOpError([&] { select_kv_ragged(T({1, nan, 2}, {1, 1, 3}), k, v, I32({1}, {1, 1}), 1); },
                "select_kv_ragged", {"scores"});
  // A non-finite score at a padded candidate is ignored.
  EXPECT_EQ(Ints(std::get<2>(select_kv(T({nan, 1, 2}, {1, 1, 3}), k, v, 1, 1,
                                       Mask({0, 1, 1, 1}, {1, 4})))),
            (std::vector<int64_t>{2, 3}));
}

TEST(Errors, RaggedAttentionSegmentsAndHeads) {
  const Tensor q = at::zeros({1, 2, 3, 4}, kF), kv = at::zeros({10, 4}, kF);
  ExpectOpError([&] { ragged_attention(q, kv, kv, I32({0, 5}, {1, 2}), I32({3, 2}, {1, 2})); },
                "ragged_attention", {"lengths must be >= q = 3", "got 2 at [0, 1]"});
  ExpectOpError([&] { ragged_attention(q, kv, kv, I32({0, 8}, {1, 2}), I32({3, 3}, {1, 2})); },
                "ragged_attention", {"segment [0, 1]", "8 + 3", "exceeds the S = 10 rows"});
  const Tensor three_heads = I32({0, 3, 6}, {1, 3});
  ExpectOpError([&] { ragged_attention(q, kv, kv, three_heads, I32({3, 3, 3}, {1, 3})); },
                "ragged_attention", {"query heads Hq = 2", "Hkv = starts.size(1) = 3"});
}

}  // namespace

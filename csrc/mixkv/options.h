// String options of the ops, parsed once into enums (bad strings get an error naming the op).
#pragma once

#include <c10/util/string_view.h>

#include "mixkv/checks.h"

namespace mixkv {

enum class Pooling { Avg, Max };
enum class GqaReduce { Mean, Max };
// attn: S = A; keydiff: S = D~; vnorm: S = A + V~; mix3: (A + V~ + D~)/3;
// mixkv: S = r D~ + (1 - r)(A + V~).
enum class Mode { Attn, KeyDiff, VNorm, Mix3, MixKV };
enum class Policy { Uniform, Pyramid, Adaptive, Explicit };

Pooling parse_pooling(const char* op, c10::string_view s);
GqaReduce parse_gqa_reduce(const char* op, c10::string_view s);
Mode parse_mode(const char* op, c10::string_view s);
Policy parse_policy(const char* op, c10::string_view s);

inline bool mode_uses_value_norm(Mode m) {
  return m == Mode::VNorm || m == Mode::Mix3 || m == Mode::MixKV;
}
inline bool mode_uses_diversity(Mode m) {
  return m == Mode::KeyDiff || m == Mode::Mix3 || m == Mode::MixKV;
}

}  // namespace mixkv

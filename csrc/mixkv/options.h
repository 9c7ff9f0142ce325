// String options of the ops, parsed once into enums (bad strings get an error naming the op).
// Mode and the mixing formula live in mix.h, shared with the CUDA kernels.
#pragma once

#include <c10/util/string_view.h>

#include "mixkv/checks.h"
#include "mixkv/mix.h"

namespace mixkv {

enum class Pooling { Avg, Max };
enum class GqaReduce { Mean, Max };
enum class Policy { Uniform, Pyramid, Adaptive, Explicit };

Pooling parse_pooling(const char* op, c10::string_view s);
GqaReduce parse_gqa_reduce(const char* op, c10::string_view s);
Mode parse_mode(const char* op, c10::string_view s);
Policy parse_policy(const char* op, c10::string_view s);

}  // namespace mixkv

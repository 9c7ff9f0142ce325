// Parsing of the ops' string options (see mixkv/options.h).
#include "mixkv/options.h"

namespace mixkv {

Pooling parse_pooling(const char* op, c10::string_view s) {
  if (s == "avg") return Pooling::Avg;
  if (s == "max") return Pooling::Max;
  MIXKV_CHECK_VALUE(false, op, "pooling must be 'avg' or 'max', got '", s, "'");
}

GqaReduce parse_gqa_reduce(const char* op, c10::string_view s) {
  if (s == "mean") return GqaReduce::Mean;
  if (s == "max") return GqaReduce::Max;
  MIXKV_CHECK_VALUE(false, op, "gqa_reduce must be 'mean' or 'max', got '", s, "'");
}

Mode parse_mode(const char* op, c10::string_view s) {
  if (s == "attn") return Mode::Attn;
  if (s == "keydiff") return Mode::KeyDiff;
  if (s == "vnorm") return Mode::VNorm;
  if (s == "mix3") return Mode::Mix3;
  if (s == "mixkv") return Mode::MixKV;
  MIXKV_CHECK_VALUE(false, op, "mode must be one of attn, keydiff, vnorm, mix3, mixkv; got '", s,
                    "'");
}

Policy parse_policy(const char* op, c10::string_view s) {
  if (s == "uniform") return Policy::Uniform;
  if (s == "pyramid") return Policy::Pyramid;
  if (s == "adaptive") return Policy::Adaptive;
  if (s == "explicit") return Policy::Explicit;
  MIXKV_CHECK_VALUE(false, op, "policy must be one of uniform, pyramid, adaptive, explicit; got '",
                    s, "'");
}

}  // namespace mixkv

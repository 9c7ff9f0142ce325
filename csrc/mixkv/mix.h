// The score modes and the mixing formula (docs/design.md section 4, steps 4-5), written once for
// the CPU and the CUDA kernels. No torch headers: .cu files include it.
#pragma once

#if defined(__CUDACC__)
#define MIXKV_HOST_DEVICE __host__ __device__
#else
#define MIXKV_HOST_DEVICE
#endif

namespace mixkv {

// attn: S = A; keydiff: S = D~; vnorm: S = A + V~; mix3: (A + V~ + D~)/3;
// mixkv: S = r D~ + (1 - r)(A + V~).
enum class Mode { Attn, KeyDiff, VNorm, Mix3, MixKV };

constexpr bool mode_uses_value_norm(Mode m) {
  return m == Mode::VNorm || m == Mode::Mix3 || m == Mode::MixKV;
}
constexpr bool mode_uses_diversity(Mode m) {
  return m == Mode::KeyDiff || m == Mode::Mix3 || m == Mode::MixKV;
}
constexpr bool mode_uses_redundancy(Mode m) { return m == Mode::MixKV; }

// One IEEE rounding per operation on every backend (nvcc would otherwise fuse a * b + c into an
// FMA), so that the CPU and CUDA kernels produce the same bits.
MIXKV_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MIXKV_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// x min-max normalised over the head's real candidates to [0, 1]; 0 when they are all equal.
MIXKV_HOST_DEVICE inline float unit_scaled(float x, float lo, float spread) {
  return spread > 0.f ? (x - lo) / spread : 0.f;
}

// The score of one candidate from its importance a, rescaled value norm vt and diversity dt, and
// the head's redundancy r (the terms a mode does not use are ignored).
MIXKV_HOST_DEVICE inline float mix_score(Mode mode, float a, float vt, float dt, float r) {
  switch (mode) {
    case Mode::Attn: return a;
    case Mode::KeyDiff: return dt;
    case Mode::VNorm: return add_rn(a, vt);
    case Mode::Mix3: return add_rn(add_rn(a, vt), dt) / 3.f;
    case Mode::MixKV: return add_rn(mul_rn(r, dt), mul_rn(1.f - r, add_rn(a, vt)));
  }
  return a;
}

}  // namespace mixkv

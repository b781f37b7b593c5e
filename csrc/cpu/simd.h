// Explicit SIMD on GCC/Clang vector types for the per-token epilogues (ppo.cpp): W float32 lanes per vector, the
// float64 statistics in W float64 lanes. Plain vector arithmetic, compares and selects (no branches), so each
// SIGNAL_MULTIVERSION clone compiles them to its own ISA (two SSE registers, one AVX2 register, ...). The per-lane
// arithmetic is that of the scalar code, operation for operation (vexp_v is common.h's vexp on W lanes).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace signalrl {
namespace simd {

constexpr int W = 8;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef double vd __attribute__((vector_size(8 * W)));

#define SIGNAL_SIMD_INLINE inline __attribute__((always_inline))

SIGNAL_SIMD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SIGNAL_SIMD_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
SIGNAL_SIMD_INLINE vf splat(float x) { return vf{} + x; }
SIGNAL_SIMD_INLINE vd splat_d(double x) { return vd{} + x; }
SIGNAL_SIMD_INLINE vd to_d(vf x) { return __builtin_convertvector(x, vd); }
// m: a compare result (all bits set where true)
SIGNAL_SIMD_INLINE vf select(vi m, vf a, vf b) { return m ? a : b; }
SIGNAL_SIMD_INLINE vi is_nan(vf x) { return x != x; }
SIGNAL_SIMD_INLINE vf fabs_v(vf x) { return (vf)((vi)x & 0x7FFFFFFF); }
SIGNAL_SIMD_INLINE vf one_if(vi m) { return select(m, splat(1.0f), vf{}); }

// NaN-propagating max / min / clamp (torch.maximum / torch.minimum / torch.clamp)
SIGNAL_SIMD_INLINE vf nan_max(vf a, vf b) {
  return select(is_nan(a) | is_nan(b), splat(std::numeric_limits<float>::quiet_NaN()), select(a > b, a, b));
}
SIGNAL_SIMD_INLINE vf nan_min(vf a, vf b) {
  return select(is_nan(a) | is_nan(b), splat(std::numeric_limits<float>::quiet_NaN()), select(a < b, a, b));
}
SIGNAL_SIMD_INLINE vf nan_clamp(vf x, vf lo, vf hi) {
  const vf y = select(x < lo, lo, x);
  return select(is_nan(x), x, select(y > hi, hi, y));
}

// common.h's vexp on W lanes, the same operations in the same order
SIGNAL_SIMD_INLINE vf vexp_v(vf x) {
  const vf lo_lim = splat(-86.6f), hi_lim = splat(88.75f);
  vf xc = select(x < lo_lim, lo_lim, x);
  xc = select(xc > hi_lim, hi_lim, xc);
  const vf t = xc * 1.44269504088896341f;
  const vf fn = (t + 12582912.0f) - 12582912.0f;
  vf r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * r * r + r + 1.0f;
  const vi n = __builtin_convertvector(fn, vi);
  const vi bits = (n + 126) << 23;
  vf res = (y * 2.0f) * (vf)bits;
  res = select(x < lo_lim, vf{}, res);
  res = select(x > hi_lim, splat(std::numeric_limits<float>::infinity()), res);
  return res;
}

}  // namespace simd
}  // namespace signalrl

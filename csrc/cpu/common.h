// Shared scalar helpers for the native CPU kernels: a branch-free exp the compiler can
// vectorize, bf16 <-> fp32 bit conversions, and per-ISA function cloning.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// SIGNAL_MULTIVERSION compiles a function once per ISA level and picks one at load time
// (GCC ifunc), so one binary is fast on AVX-512 and AVX2 machines and still runs everywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(SIGNAL_NO_MULTIVERSION)
#define SIGNAL_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIGNAL_MULTIVERSION
#endif

namespace signalrl {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// exp(x) for float32 with ~1 ulp error, no branches and no libm call, so loops over it
// vectorize. exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial (Cephes coefficients).
// exp_reduced: for a clamped xc, exp(r) and n (as a float)
inline float exp_reduced(float xc, float* fn_out) {
  // round to nearest with the 1.5 * 2^23 trick (exact for |t| < 2^22; needs no -ffast-math)
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  *fn_out = fn;
  return p * r * r + r + 1.0f;
}

// 2^n is applied as 2 * 2^(n-1), so n = 128 stays a normal float: results overflow to inf exactly where float32
// does (above 88.72); below -86.6 (results under 2.3e-38, float32's smallest normals) they flush to 0. NaN stays
// NaN.
inline float vexp(float x) {
  float xc = x < -86.6f ? -86.6f : x;
  xc = xc > 88.75f ? 88.75f : xc;
  float fn;
  const float y = exp_reduced(xc, &fn);
  const int32_t n = static_cast<int32_t>(fn);  // in [-125, 128]
  float res = (y * 2.0f) * bits_to_float(static_cast<uint32_t>(n + 126) << 23);
  res = x < -86.6f ? 0.0f : res;
  res = x > 88.75f ? std::numeric_limits<float>::infinity() : res;
  return res;
}

// vexp for x ≤ 0 (x − max, log-probs; NaN stays NaN): the same bits as vexp there, without its upper clamp,
// its overflow select and one multiply (2^n is formed directly: n ≤ 0 has no overflow to avoid). Exact up to
// x < 0.34 (n = 0), which covers a log-prob rounded a few ulps above 0.
inline float vexp_nonpos(float x) {
  float fn;
  const float y = exp_reduced(x < -86.6f ? -86.6f : x, &fn);
  const int32_t n = static_cast<int32_t>(fn);  // in [-125, 0]
  const float res = y * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  return x < -86.6f ? 0.0f : res;
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// round to nearest even, NaN -> quiet NaN (same result as c10::BFloat16(float))
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

}  // namespace signalrl

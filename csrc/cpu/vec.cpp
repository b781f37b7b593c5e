// Row primitives shared by the log-prob kernels. Plain loops over fixed-width lane arrays:
// the compiler turns each lane loop into SIMD code (one clone per ISA level, see common.h),
// and the lane accumulators keep several independent dependency chains in flight.
#include "vec.h"

#include <c10/util/Half.h>

#include "common.h"

namespace signalrl {

namespace {
constexpr int kLanes = 32;

// max that keeps a NaN once it has seen one
inline float pick_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }
}  // namespace

SIGNAL_MULTIVERSION float vec_max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = pick_max(acc[l], x[j + l]);
  }
  float m = kNegInf;
  for (; j < n; ++j) m = pick_max(m, x[j]);
  for (int l = 0; l < kLanes; ++l) m = pick_max(m, acc[l]);
  return m;
}

namespace {
// With d_j = (x[j] − m)·scale ≤ 0 (m is the max; NaN stays NaN): *sum += Σ exp(d_j), *dot += Σ exp(d_j)·d_j when dot
// is given, out[j] = exp(d_j) when STORE. The body of vec_sum_exp and vec_exp_sum, inlined into each one's per-ISA
// clones.
template <bool STORE>
inline __attribute__((always_inline)) void exp_sums(const float* x, int64_t n, float scale, float m, float* out,
                                                    float* sum, float* dot) {
  float s_acc[kLanes];
  float d_acc[kLanes];
  for (int l = 0; l < kLanes; ++l) s_acc[l] = d_acc[l] = 0.0f;
  int64_t j = 0;
  if (dot != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float d = (x[j + l] - m) * scale;
        const float e = vexp_nonpos(d);
        if constexpr (STORE) out[j + l] = e;
        s_acc[l] += e;
        d_acc[l] += e > 0.0f ? e * d : 0.0f;
      }
    }
  } else if (scale == 1.0f) {
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float e = vexp_nonpos(x[j + l] - m);
        if constexpr (STORE) out[j + l] = e;
        s_acc[l] += e;
      }
    }
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float e = vexp_nonpos((x[j + l] - m) * scale);
        if constexpr (STORE) out[j + l] = e;
        s_acc[l] += e;
      }
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const float d = (x[j] - m) * scale;
    const float e = vexp_nonpos(d);
    if constexpr (STORE) out[j] = e;
    s_acc[l] += e;
    d_acc[l] += e > 0.0f ? e * d : 0.0f;
  }
  float s = 0.0f, t = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    s += s_acc[l];
    t += d_acc[l];
  }
  *sum += s;
  if (dot != nullptr) *dot += t;
}
}  // namespace

SIGNAL_MULTIVERSION void vec_sum_exp(const float* x, int64_t n, float scale, float m, float* sum, float* dot) {
  exp_sums<false>(x, n, scale, m, nullptr, sum, dot);
}

SIGNAL_MULTIVERSION void vec_exp_sum(const float* x, int64_t n, float scale, float m, float* out, float* sum,
                                     float* dot) {
  exp_sums<true>(x, n, scale, m, out, sum, dot);
}

SIGNAL_MULTIVERSION float vec_sum(const float* x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  }
  float s = 0.0f;
  for (; j < n; ++j) s += x[j];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

SIGNAL_MULTIVERSION void vec_softmax_grad(const float* x, int64_t n, float scale, float lse_hi,
                                          float lse_lo, float c0, float c1, float out_scale, float* out) {
  const float* z = x;
  if (scale != 1.0f) {
    // Round z = x·scale first (a separate loop, so it is not fused into an FMA with − lse):
    // then the largest logit of a one-token vocabulary gets lp = 0 exactly, as in the forward.
    for (int64_t j = 0; j < n; ++j) out[j] = x[j] * scale;
    z = out;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float lp = (z[j] - lse_hi) - lse_lo;  // ≤ 0 up to rounding
    const float p = vexp_nonpos(lp);
    const float g = -out_scale * p * (c0 + c1 * lp);
    out[j] = p > 0.0f ? g : 0.0f;
  }
}

SIGNAL_MULTIVERSION void bf16_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(src[j]);
}

SIGNAL_MULTIVERSION void f32_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

SIGNAL_MULTIVERSION void f16_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = c10::detail::fp16_ieee_to_fp32_value(src[j]);
}

SIGNAL_MULTIVERSION void f32_to_f16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = c10::detail::fp16_ieee_from_fp32_value(src[j]);
}

}  // namespace signalrl

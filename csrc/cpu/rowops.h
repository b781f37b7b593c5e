// Row-level building blocks of the log-prob kernels: dtype-generic block loads/stores and the
// online log-sum-exp state.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "vec.h"

namespace signalrl {

// float32 / bfloat16 / float16 (the dtypes the log-prob kernels accept)
#define SIGNAL_DISPATCH_LOGITS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Elements per block: a block is loaded from memory once and then reused from L1.
constexpr int64_t kRowBlock = 2048;

// n elements of src as float32: src itself for float32, else converted into buf.
inline const float* load_f32(const float* src, int64_t, float*) { return src; }
inline const float* load_f32(const at::BFloat16* src, int64_t n, float* buf) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), n, buf);
  return buf;
}
inline const float* load_f32(const at::Half* src, int64_t n, float* buf) {
  f16_to_f32(reinterpret_cast<const uint16_t*>(src), n, buf);
  return buf;
}

// Where to compute n float32 results destined for dst: dst itself for float32, else buf.
inline float* f32_target(float* dst, float*) { return dst; }
inline float* f32_target(at::BFloat16*, float* buf) { return buf; }
inline float* f32_target(at::Half*, float* buf) { return buf; }

// Finish a block computed into f32_target(dst, buf).
inline void store_f32(const float*, int64_t, float*) {}
inline void store_f32(const float* src, int64_t n, at::BFloat16* dst) {
  f32_to_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
}
inline void store_f32(const float* src, int64_t n, at::Half* dst) {
  f32_to_f16(src, n, reinterpret_cast<uint16_t*>(dst));
}

// Online log-sum-exp over z = x * scale (scale > 0), fed block by block. m is the running max
// of x (not z), s = Σ exp((x − m)·scale), d = Σ exp((x − m)·scale)·(x − m)·scale; then
// lse = m·scale + log(s) and entropy = log(s) − d / s. Measuring from the max of x keeps the
// max term exactly exp(0) = 1 and avoids cancellation when |z| is large.
struct OnlineLse {
  float m = kNegInf;
  float s = 0.0f;
  float d = 0.0f;

  void update(const float* x, int64_t n, float scale, bool with_entropy) {
    const float bm = vec_max(x, n);  // NaN if the block holds a NaN
    if (bm == kNegInf) return;       // every term is exp(-inf) = 0
    raise_max(bm, scale);
    vec_sum_exp(x, n, scale, m, &s, with_entropy ? &d : nullptr);
  }

  // update() that also writes out[j] = exp((x[j] − m')·scale) about the new running max m' (out may alias x) and
  // gives their sum, for a caller that accumulates Σ_j out[j]·y_j over the blocks: its earlier sums must be multiplied
  // by the returned factor exp((m − m')·scale) (1 when the max did not grow or nothing was summed yet).
  float update_exp(const float* x, int64_t n, float scale, bool with_entropy, float* out, float* block_sum) {
    const float bm = vec_max(x, n);
    *block_sum = 0.0f;
    if (bm == kNegInf) {  // every term is exp(-inf) = 0
      std::fill(out, out + n, 0.0f);
      return 1.0f;
    }
    const float alpha = raise_max(bm, scale);
    vec_exp_sum(x, n, scale, m, out, block_sum, with_entropy ? &d : nullptr);
    s += *block_sum;
    return alpha;
  }

  // Fold in the state of another range of the same row (computed with the same scale): the state of both ranges.
  void merge(const OnlineLse& o, float scale) {
    if (o.m == kNegInf) return;  // nothing there (every term exp(-inf) = 0)
    if (m == kNegInf) {
      *this = o;
      return;
    }
    raise_max(o.m, scale);
    const float shift = (o.m - m) * scale;  // <= 0 (NaN if either max is NaN, which then propagates)
    const float alpha = std::exp(shift);
    s += alpha * o.s;
    d += alpha * (o.d + shift * o.s);
  }

  // float64, so the backward can rebuild log p without lse's float32 rounding (split_lse)
  double lse(float scale) const { return static_cast<double>(m * scale) + static_cast<double>(std::log(s)); }
  // log p of the logit z (already scaled): z − max is exact near the max, unlike z − fl32(lse)
  float logprob(float z, float scale) const { return (z - m * scale) - std::log(s); }
  float entropy() const { return std::log(s) - d / s; }

  // Moves the running max up to bm if bm is larger, rescaling s and d to it; the factor exp((m − bm)·scale) applied
  // (1 when the max did not grow or nothing was summed yet).
  float raise_max(float bm, float scale) {
    float alpha = 1.0f;
    if (bm > m) {
      if (s > 0.0f) {
        const float shift = (m - bm) * scale;
        alpha = std::exp(shift);
        d = alpha * (d + shift * s);
        s *= alpha;
      }
      m = bm;
    }
    return alpha;
  }
};

// The state of row i merged over the G groups of a group plan (states [G, nr], group-major), in group order.
inline OnlineLse merged_row(const OnlineLse* state, int64_t G, int64_t nr, int64_t i, float scale) {
  OnlineLse tot = state[i];
  for (int64_t g = 1; g < G; ++g) tot.merge(state[g * nr + i], scale);
  return tot;
}

// A float64 lse as hi + lo float32 (hi = fl32(lse)): log p = (z − hi) − lo in float32 is exact to float32's
// rounding of the result, where z − fl32(lse) carries |lse|·2^-24 (6e-4 relative at |lse| = 1e4).
struct LseParts {
  float hi, lo;
};
// lo is 0 where lse is not finite (an inf logit then gives NaN in its own column only).
inline LseParts split_lse(double lse) {
  const float hi = static_cast<float>(lse);
  const float lo = static_cast<float>(lse - static_cast<double>(hi));
  return {hi, lo == lo ? lo : 0.0f};
}

}  // namespace signalrl

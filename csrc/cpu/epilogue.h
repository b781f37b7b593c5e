// The per-token epilogue loops shared by ppo.cpp and ppo_value.cpp: fixed chunks of tokens (the unit of threading
// and of merging partial statistics in order, so no result depends on the thread count), W tokens at a time
// (simd.h), float32 partial sums over sub-blocks flushed into float64.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace signalrl {
namespace epilogue {

#define SIGNAL_INLINE inline __attribute__((always_inline))

using simd::vd;
using simd::vf;
using simd::vi;
using simd::W;

constexpr int64_t kChunk = 4096;
// Sums over a chunk are formed in float32 over sub-blocks of kSubBlock tokens (at most kSubBlock / W adds per
// lane), each sub-block's lanes then added into float64: float64 accuracy across the chunk at float32 cost per token.
constexpr int64_t kSubBlock = 256;

inline int64_t chunks_of(int64_t n) { return std::max<int64_t>(1, (n + kChunk - 1) / kChunk); }

inline at::Tensor scalar_f32(double x) { return at::full({}, x, at::TensorOptions().dtype(at::kFloat)); }

// Σ of the W float64 lanes, in lane order
SIGNAL_INLINE double lanes_total(vd acc) {
  double s = 0.0;
  for (int l = 0; l < W; ++l) s += acc[l];
  return s;
}

// Runs body(inputs, outputs, i) on tokens [b, e) W at a time: the body reads inputs[k] + i and writes
// outputs[k] + i (the base pointers stay loop-invariant, so they live in registers). The inputs are NIN float
// arrays, the outputs NOUT; the last partial vector runs on zero-padded copies at i = 0 (mask and weights 0 there,
// so it adds nothing to any statistic) and writes only its real tokens back.
template <int NIN, int NOUT, class F>
SIGNAL_INLINE void for_vectors(int64_t b, int64_t e, const float* const (&in)[NIN], float* const (&out)[NOUT],
                               F&& body) {
  int64_t i = b;
  for (; i + W <= e; i += W) body(in, out, i);
  if (i < e) {
    const int64_t n = e - i;
    alignas(64) float tin[NIN][W], tout[NOUT > 0 ? NOUT : 1][W];
    const float* pin[NIN];
    float* pout[NOUT > 0 ? NOUT : 1];
    for (int k = 0; k < NIN; ++k) {
      for (int l = 0; l < W; ++l) tin[k][l] = (in[k] != nullptr && l < n) ? in[k][i + l] : 0.0f;
      pin[k] = in[k] == nullptr ? nullptr : tin[k];
    }
    for (int k = 0; k < NOUT; ++k) pout[k] = out[k] == nullptr ? nullptr : tout[k];
    body(pin, pout, int64_t{0});
    for (int k = 0; k < NOUT; ++k)
      if (out[k] != nullptr)
        for (int64_t l = 0; l < n; ++l) out[k][i + l] = tout[k][l];
  }
}

// f(sb, se) over the sub-blocks [sb, se) of [b, e). Inside a SIGNAL_MULTIVERSION function, f (like for_vectors'
// body) must be an always_inline lambda: an outlined one is compiled for the baseline ISA only.
template <class F>
SIGNAL_INLINE void for_sub_blocks(int64_t b, int64_t e, F&& f) {
  for (int64_t sb = b; sb < e; sb += kSubBlock) f(sb, std::min(e, sb + kSubBlock));
}

}  // namespace epilogue

// The pass over a [N] float32 mask that both PPO kernels make first (ppo.cpp): Σ m, for the token-mean weights
// m / max(Σ m, 1), in fixed chunks merged in order; with `check`, also the value check of
// signalrl.ops._validate.mask_values (a negative, NaN or ±inf value raises ValueError; the op layer then names the
// first one).
double mask_sum(const float* m, int64_t N, bool check);

}  // namespace signalrl

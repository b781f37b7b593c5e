// Vectorized row primitives over float32 buffers (defined in vec.cpp, compiled per ISA level).
#pragma once

#include <cstdint>

namespace signalrl {

// max_j x[j]; NaN if any x[j] is NaN; -inf for n == 0.
float vec_max(const float* x, int64_t n);

// With d_j = (x[j] - m) * scale:  *sum += Σ exp(d_j);  if dot != nullptr, *dot += Σ exp(d_j) * d_j
// (terms with exp(d_j) == 0 contribute 0, so -inf logits are harmless).
void vec_sum_exp(const float* x, int64_t n, float scale, float m, float* sum, float* dot);

// Σ x[j] (float32 lanes)
float vec_sum(const float* x, int64_t n);

// With d_j = (x[j] - m) * scale (m: the max of x, so d_j <= 0): out[j] = exp(d_j);  *sum += Σ out[j];  if dot !=
// nullptr, *dot += Σ out[j] * d_j (as vec_sum_exp). out may alias x.
void vec_exp_sum(const float* x, int64_t n, float scale, float m, float* out, float* sum, float* dot);

// With lp_j = (x[j] * scale - lse_hi) - lse_lo and p_j = exp(lp_j):
//   out[j] = -out_scale * p_j * (c0 + c1 * lp_j)      (0 where p_j == 0).
// out may alias x. (lse_hi, lse_lo): split_lse of the forward's float64 lse.
void vec_softmax_grad(const float* x, int64_t n, float scale, float lse_hi, float lse_lo, float c0,
                      float c1, float out_scale, float* out);

// dtype conversions (bf16 round-to-nearest-even, NaN preserved)
void bf16_to_f32(const uint16_t* src, int64_t n, float* dst);
void f32_to_bf16(const float* src, int64_t n, uint16_t* dst);
void f16_to_f32(const uint16_t* src, int64_t n, float* dst);
void f32_to_f16(const float* src, int64_t n, uint16_t* dst);

}  // namespace signalrl

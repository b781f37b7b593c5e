// family gae: generalized advantage estimation over [B, T] rows with exact mask semantics.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace signalrl {

namespace {

// G rows at once, walking t backwards. Each row is an independent dependency chain, so G rows
// in flight hide the latency of the recurrence. Masked positions are handled with selects
// (no branches): they output 0 and leave the carried next-value / next-advantage untouched,
// which is exactly "drop the masked positions, run GAE, scatter back".
template <int G>
inline __attribute__((always_inline)) void gae_group(const float* r, const float* v,
                                                     const float* m, const float* last,
                                                     float* adv, float* ret, int64_t T,
                                                     float gamma, float gl) {
  float nv[G], na[G];
  for (int k = 0; k < G; ++k) {
    nv[k] = last[k];
    na[k] = 0.0f;
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int k = 0; k < G; ++k) {
      const int64_t o = k * T + t;
      const bool valid = m[o] != 0.0f;
      const float vv = v[o];
      const float a = (r[o] + gamma * nv[k] - vv) + gl * na[k];
      adv[o] = valid ? a : 0.0f;
      ret[o] = valid ? a + vv : 0.0f;
      nv[k] = valid ? vv : nv[k];
      na[k] = valid ? a : na[k];
    }
  }
}

SIGNAL_MULTIVERSION void gae_rows(const float* r, const float* v, const float* m,
                                  const float* last, float* adv, float* ret, int64_t b0,
                                  int64_t b1, int64_t T, float gamma, float gl) {
  constexpr int G = 8;
  int64_t b = b0;
  for (; b + G <= b1; b += G) {
    gae_group<G>(r + b * T, v + b * T, m + b * T, last + b, adv + b * T, ret + b * T, T, gamma,
                 gl);
  }
  for (; b < b1; ++b) {
    gae_group<1>(r + b * T, v + b * T, m + b * T, last + b, adv + b * T, ret + b * T, T, gamma,
                 gl);
  }
}

void check_bt(const char* name, const at::Tensor& t, int64_t B, int64_t T) {
  TORCH_CHECK(t.device().is_cpu(), "gae_fwd: expected CPU tensors, got ", name, " on ",
              t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, "gae_fwd: ", name, " must be [",
              B, ", ", T, "], got shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards_in,
                                           const at::Tensor& values_in,
                                           const at::Tensor& mask_in,
                                           const at::Tensor& last_values_in, double gamma,
                                           double lam) {
  TORCH_CHECK(rewards_in.dim() == 2, "gae_fwd: rewards must be [B, T], got shape ",
              rewards_in.sizes());
  const int64_t B = rewards_in.size(0), T = rewards_in.size(1);
  check_bt("rewards", rewards_in, B, T);
  check_bt("values", values_in, B, T);
  check_bt("mask", mask_in, B, T);
  TORCH_CHECK(last_values_in.dim() == 1 && last_values_in.size(0) == B,
              "gae_fwd: last_values must be [", B, "], got shape ", last_values_in.sizes());
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor r = f32(rewards_in), v = f32(values_in), m = f32(mask_in);
  const at::Tensor last = f32(last_values_in);
  at::Tensor adv = at::empty({B, T}, r.options());
  at::Tensor ret = at::empty({B, T}, r.options());
  if (B == 0 || T == 0) return {adv, ret};
  const float g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
  const float* rp = r.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* lp = last.data_ptr<float>();
  float* ap = adv.data_ptr<float>();
  float* tp = ret.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(8, 32768 / T);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    gae_rows(rp, vp, mp, lp, ap, tp, b0, b1, T, g, gl);
  });
  return {adv, ret};
}

}  // namespace signalrl

// The KL estimators of d = lp − ref (k1, k2, k3, abs) and their derivative in d, in float32 without branches so
// the loops over them vectorize: used by the kl ops (kl.cpp) and the PPO epilogues (ppo.cpp, linear_ppo.cpp).
// The math is that of signalrl/reference/kl.py and of the Triton _kl_math (signalrl/kernels/kl.py).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <type_traits>

#include "common.h"
#include "simd.h"

namespace signalrl {

enum class KlEst { k1, k2, k3, abs };

inline KlEst kl_code(const char* fn, c10::string_view name) {
  if (name == "k1") return KlEst::k1;
  if (name == "k2") return KlEst::k2;
  if (name == "k3") return KlEst::k3;
  if (name == "abs") return KlEst::abs;
  TORCH_CHECK(false, fn, ": kl_estimator must be one of k1, k2, k3, abs, got '", name, "'");
}

// Σ_{n=0}^{8} (−d)^n / (n + K)!, by Horner from the last term: the tails of exp(−d) that k3 needs near d = 0,
// k3 = d²·exp_tail<2>(d) and 1 − exp(−d) = d·exp_tail<1>(d) (truncated below 1e-9 relative for |d| < 1/2).
// T: float, or a float vector of simd.h.
template <int K, class T = float>
inline T exp_tail(T d) {
  constexpr float kFactorial[] = {1.0f, 1.0f, 2.0f, 6.0f, 24.0f, 120.0f, 720.0f, 5040.0f, 40320.0f, 362880.0f,
                                  3628800.0f};
  constexpr int kTerms = 9;
  T p = T{} + 1.0f / kFactorial[kTerms - 1 + K];
  for (int n = kTerms - 2; n >= 0; --n) p = p * d + (n % 2 ? -1.0f : 1.0f) / kFactorial[n + K];
  return p;
}

// KL estimate of d = lp − ref and its derivative in d, in float32 without branches (the loops vectorize).
// k3: exp(−d) + d − 1 and 1 − exp(−d) cancel catastrophically near d = 0, where a policy close to its reference
// lives, so for |d| < 1/2 their Taylor series are used, truncated below 1e-9 relative (as the Triton kernel does).
template <KlEst E>
inline void kl_math_t(float d, float& kl, float& g) {
  if constexpr (E == KlEst::k1) {
    kl = d;
    g = 1.0f;
  } else if constexpr (E == KlEst::k2) {
    kl = 0.5f * d * d;
    g = d;
  } else if constexpr (E == KlEst::k3) {
    const float e = vexp(-d);
    const float p = exp_tail<2>(d);
    const float q = exp_tail<1>(d);
    const bool small = std::fabs(d) < 0.5f;
    kl = small ? d * d * p : e + d - 1.0f;
    g = small ? d * q : 1.0f - e;
  } else {
    kl = std::fabs(d);
    g = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
  }
}

// kl_math_t on the lanes of a simd.h vector: the same operations, selects for the ternaries
template <KlEst E>
inline __attribute__((always_inline)) void kl_math_v(simd::vf d, simd::vf& kl, simd::vf& g) {
  using namespace simd;
  if constexpr (E == KlEst::k1) {
    kl = d;
    g = splat(1.0f);
  } else if constexpr (E == KlEst::k2) {
    kl = 0.5f * d * d;
    g = d;
  } else if constexpr (E == KlEst::k3) {
    const vf e = vexp_v(-d);
    const vf p = exp_tail<2>(d);
    const vf q = exp_tail<1>(d);
    const vi small = fabs_v(d) < splat(0.5f);
    kl = select(small, d * d * p, e + d - 1.0f);
    g = select(small, d * q, 1.0f - e);
  } else {
    kl = fabs_v(d);
    g = select(d > vf{}, splat(1.0f), select(d < vf{}, splat(-1.0f), vf{}));
  }
}

// f(std::integral_constant<KlEst, E>{}) for the runtime estimator: one instantiation per estimator
template <class F>
inline void with_estimator(KlEst est, F&& f) {
  switch (est) {
    case KlEst::k1: return f(std::integral_constant<KlEst, KlEst::k1>{});
    case KlEst::k2: return f(std::integral_constant<KlEst, KlEst::k2>{});
    case KlEst::k3: return f(std::integral_constant<KlEst, KlEst::k3>{});
    case KlEst::abs: return f(std::integral_constant<KlEst, KlEst::abs>{});
  }
}

inline void kl_math(float d, KlEst est, float& kl, float& g) {
  with_estimator(est, [&](auto e) { kl_math_t<decltype(e)::value>(d, kl, g); });
}

}  // namespace signalrl

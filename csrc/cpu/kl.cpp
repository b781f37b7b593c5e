// family kl: the per-token KL estimators on [N] vectors, forward and backward (the math: kl.h).
// Element-wise; split across threads only when the call holds enough work (parallel.h); memory: the output only.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "kl.h"
#include "parallel.h"

namespace signalrl {

namespace {

// single-thread cost of one token (ns; 2-core AMD EPYC, k3 with the vectorized exp)
constexpr double kTokenNs = 0.6;

using detail::vec_f32;

// out[i] = KL(lp[i] − ref[i]) (forward) or grad[i]·dKL/dd (backward), one estimator per instantiation
template <KlEst E, bool BWD>
SIGNAL_MULTIVERSION void kl_loop(const float* lp, const float* ref, const float* grad, float* out, int64_t b,
                                 int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    float kl, g;
    kl_math_t<E>(lp[i] - ref[i], kl, g);
    if constexpr (BWD) {
      out[i] = grad[i] * g;
    } else {
      out[i] = kl;
    }
  }
}

template <bool BWD>
void kl_apply(KlEst est, const float* lp, const float* ref, const float* grad, float* out, int64_t N) {
  parallel_work(0, N, kTokenNs, [&](int64_t b, int64_t e) {
    with_estimator(est, [&](auto k) { kl_loop<decltype(k)::value, BWD>(lp, ref, grad, out, b, e); });
  });
}

}  // namespace

at::Tensor kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                          c10::string_view estimator) {
  constexpr const char* fn = "kl_penalty_fwd";
  TORCH_CHECK(logprobs.dim() == 1, fn, ": logprobs must be [N], got shape ", logprobs.sizes());
  const int64_t N = logprobs.size(0);
  const at::Tensor lp_t = vec_f32(fn, "logprobs", logprobs, N);
  const at::Tensor ref_t = vec_f32(fn, "ref_logprobs", ref_logprobs, N);
  const KlEst est = kl_code(fn, estimator);
  at::Tensor out = at::empty({N}, lp_t.options());
  const float* lp = lp_t.data_ptr<float>();
  const float* ref = ref_t.data_ptr<float>();
  kl_apply<false>(est, lp, ref, nullptr, out.data_ptr<float>(), N);
  return out;
}

at::Tensor kl_penalty_bwd(const at::Tensor& grad_kl, const at::Tensor& logprobs,
                          const at::Tensor& ref_logprobs, c10::string_view estimator) {
  constexpr const char* fn = "kl_penalty_bwd";
  TORCH_CHECK(logprobs.dim() == 1, fn, ": logprobs must be [N], got shape ", logprobs.sizes());
  const int64_t N = logprobs.size(0);
  const at::Tensor g_t = vec_f32(fn, "grad_kl", grad_kl, N);
  const at::Tensor lp_t = vec_f32(fn, "logprobs", logprobs, N);
  const at::Tensor ref_t = vec_f32(fn, "ref_logprobs", ref_logprobs, N);
  const KlEst est = kl_code(fn, estimator);
  at::Tensor out = at::empty({N}, lp_t.options());
  const float* gk = g_t.data_ptr<float>();
  const float* lp = lp_t.data_ptr<float>();
  const float* ref = ref_t.data_ptr<float>();
  kl_apply<true>(est, lp, ref, gk, out.data_ptr<float>(), N);
  return out;
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/kl.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("kl_penalty_fwd", &signalrl::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &signalrl::kl_penalty_bwd);
}

// family linear_ppo: the PPO policy loss from hidden states and the LM head, without [N, V] logits.
// Forward: the linear_logprobs forward (log-probs, entropy and LSE from vocab blocks, csrc/cpu/linear_logprobs.cpp)
// then the ppo epilogue (csrc/cpu/ppo.cpp) on the [N] vectors, which also gives the per-token gradient
// coefficients g_lp = w·∂ℓ/∂logp and g_H = w·∂ℓ/∂H. Backward: the linear_logprobs backward with those
// coefficients times the incoming scalar gradient. Memory: that of linear_token_logprobs plus a few [N] vectors.
// A frozen head with entropy_coef == 0 takes the frozen-head plan (linear_ppo_frozen_fwd below), a small call with a
// gradient the kept-logits plan (linear_ppo_kept_fwd).
#include <torch/library.h>
#include "kernels.h"

namespace signalrl {

// The kept-logits plan (csrc/cpu/linear_logprobs.cpp): linear_ppo_fwd's outputs and the first keep_cols logits of
// each kept row, for the backward linear_token_logprobs_kept_bwd with g_lp and g_ent times grad_loss.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_ppo_kept_fwd(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& targets, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                    const at::Tensor& weights, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
                    double temperature, int64_t ignore_index, double clip_low, double clip_high,
                    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef,
                    double entropy_coef, std::optional<double> log_ratio_clamp, int64_t keep_cols) {
  auto [lp, ent, lse, kept] =
      linear_token_logprobs_kept_fwd(hidden, weight, bias, targets, temperature, ignore_index, true, keep_cols);
  auto [loss, g_lp, g_ent, stats] =
      ppo_token_fwd(lp, old_logprobs, advantages, weights, mask, ref_logprobs, ent, clip_low, clip_high,
                    dual_clip, kl_estimator, kl_coef, entropy_coef, log_ratio_clamp);
  if (entropy_coef == 0.0) g_ent = at::empty({0}, lp.options());
  return {loss, stats, lp, ent, lse, g_lp, g_ent, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ppo_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& weights, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
    double temperature, int64_t ignore_index, double clip_low, double clip_high,
    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef, double entropy_coef,
    std::optional<double> log_ratio_clamp) {
  auto [loss, stats, lp, ent, lse, g_lp, g_ent, kept] =
      linear_ppo_kept_fwd(hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs,
                          temperature, ignore_index, clip_low, clip_high, dual_clip, kl_estimator, kl_coef,
                          entropy_coef, log_ratio_clamp, 0);
  return {loss, stats, lp, ent, lse, g_lp, g_ent};
}

// The frozen-head plan (csrc/cpu/linear_logprobs_frozen.cpp) when entropy_coef == 0: the same loss, statistics and
// g_lp, with the plan's pw and c in place of lse, so that the backward is d hidden = grad_loss·g_lp·(c·W_t − pw) / T
// (linear_token_logprobs_frozen_bwd): no pass over the vocabulary.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ppo_frozen_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& weights, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
    double temperature, int64_t ignore_index, double clip_low, double clip_high,
    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef, double entropy_coef,
    std::optional<double> log_ratio_clamp) {
  TORCH_CHECK(entropy_coef == 0.0, "linear_ppo_frozen_fwd: the frozen-head plan has no entropy gradient, so "
              "entropy_coef must be 0, got ", entropy_coef);
  auto [lp, ent, pw, coef] =
      linear_token_logprobs_frozen_fwd(hidden, weight, bias, targets, temperature, ignore_index, true);
  auto [loss, g_lp, g_ent, stats] =
      ppo_token_fwd(lp, old_logprobs, advantages, weights, mask, ref_logprobs, ent, clip_low, clip_high,
                    dual_clip, kl_estimator, kl_coef, entropy_coef, log_ratio_clamp);
  return {loss, stats, lp, ent, g_lp, pw, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ppo_bwd(
    const at::Tensor& grad_loss, const at::Tensor& g_lp, const at::Tensor& g_ent, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index,
    bool need_hidden, bool need_weight, bool need_bias) {
  TORCH_CHECK(grad_loss.numel() == 1, "linear_ppo_bwd: grad_loss must hold one value, got shape ",
              grad_loss.sizes());
  const at::Tensor scale = grad_loss.reshape({}).to(at::kFloat);
  const bool has_ent = !detail::is_empty(g_ent);
  const at::Tensor none = at::empty({0}, g_lp.options());
  return linear_token_logprobs_bwd(g_lp * scale, has_ent ? g_ent * scale : none, hidden, weight, bias, targets, lse,
                                   has_ent ? entropy : none, temperature, ignore_index, need_hidden, need_weight,
                                   need_bias);
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/linear_ppo.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("linear_ppo_fwd", &signalrl::linear_ppo_fwd);
  m.impl("linear_ppo_bwd", &signalrl::linear_ppo_bwd);
  m.impl("linear_ppo_frozen_fwd", &signalrl::linear_ppo_frozen_fwd);
  m.impl("linear_ppo_kept_fwd", &signalrl::linear_ppo_kept_fwd);
}

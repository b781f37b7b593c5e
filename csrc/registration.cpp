// Operator schemas of the signalrl_native library (callable as torch.ops.signalrl_native.<name>),
// their CPU kernels (csrc/cpu/) and shape-only Meta kernels, so FakeTensor / torch.compile can
// trace them. The contract (names, arguments, dtypes) is docs/backends.md.
#include <torch/library.h>

#include "cpu/kernels.h"

namespace {

using at::Tensor;

// Meta kernels: outputs with the right shapes and dtypes, no data.
std::tuple<Tensor, Tensor, Tensor> token_logprobs_fwd_meta(const Tensor& logits,
                                                           const Tensor& targets, double,
                                                           int64_t, bool with_entropy) {
  const int64_t N = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty({N}, f32), at::empty({with_entropy ? N : 0}, f32),
          at::empty({N}, logits.options().dtype(at::kDouble))};
}

Tensor token_logprobs_bwd_meta(const Tensor&, const Tensor&, const Tensor& logits, const Tensor&,
                               const Tensor&, const Tensor&, double, int64_t) {
  return at::empty_like(logits, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor, Tensor> linear_token_logprobs_fwd_meta(
    const Tensor& hidden, const Tensor&, const std::optional<Tensor>&, const Tensor&, double,
    int64_t, bool with_entropy) {
  const int64_t N = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  return {at::empty({N}, f32), at::empty({with_entropy ? N : 0}, f32),
          at::empty({N}, hidden.options().dtype(at::kDouble))};
}

std::tuple<Tensor, Tensor, Tensor> linear_token_logprobs_bwd_meta(
    const Tensor&, const Tensor&, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor&, const Tensor&, const Tensor&, double,
    int64_t, bool need_hidden, bool need_weight, bool need_bias) {
  const auto empty = [&](const Tensor& like) { return at::empty({0}, like.options().dtype(at::kFloat)); };
  const bool has_bias = bias.has_value() && bias->defined();
  return {need_hidden ? at::empty_like(hidden, at::MemoryFormat::Contiguous) : empty(hidden),
          need_weight ? at::empty_like(weight, at::MemoryFormat::Contiguous) : empty(weight),
          need_bias && has_bias ? at::empty_like(*bias, at::MemoryFormat::Contiguous)
                                : empty(weight)};
}

std::tuple<Tensor, Tensor> gae_fwd_meta(const Tensor& rewards, const Tensor&, const Tensor&,
                                        const Tensor&, double, double) {
  const auto f32 = rewards.options().dtype(at::kFloat);
  return {at::empty(rewards.sizes(), f32), at::empty(rewards.sizes(), f32)};
}

using OptT = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor> ppo_token_fwd_meta(
    const Tensor& logprobs, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
    const OptT& entropy, double, double, std::optional<double>, c10::string_view, double, double,
    std::optional<double>) {
  const int64_t N = logprobs.size(0);
  const auto f32 = logprobs.options().dtype(at::kFloat);
  const bool has_ent = entropy.has_value() && entropy->defined() && entropy->numel() > 0;
  return {at::empty({}, f32), at::empty({N}, f32), at::empty({has_ent ? N : 0}, f32), at::empty({9}, f32)};
}

std::tuple<Tensor, Tensor, Tensor> value_loss_fwd_meta(const Tensor& values, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, std::optional<double>) {
  const auto f32 = values.options().dtype(at::kFloat);
  return {at::empty({}, f32), at::empty({values.size(0)}, f32), at::empty({4}, f32)};
}

Tensor kl_penalty_fwd_meta(const Tensor& logprobs, const Tensor&, c10::string_view) {
  return at::empty({logprobs.size(0)}, logprobs.options().dtype(at::kFloat));
}

Tensor kl_penalty_bwd_meta(const Tensor&, const Tensor& logprobs, const Tensor&, c10::string_view) {
  return at::empty({logprobs.size(0)}, logprobs.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_ppo_fwd_meta(
    const Tensor& hidden, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptT&, double, int64_t, double, double, std::optional<double>,
    c10::string_view, double, double entropy_coef, std::optional<double>) {
  const int64_t N = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  return {at::empty({}, f32), at::empty({9}, f32), at::empty({N}, f32), at::empty({N}, f32),
          at::empty({N}, hidden.options().dtype(at::kDouble)), at::empty({N}, f32),
          at::empty({entropy_coef != 0.0 ? N : 0}, f32)};
}

std::tuple<Tensor, Tensor, Tensor> linear_ppo_bwd_meta(
    const Tensor&, const Tensor& g_lp, const Tensor& g_ent, const Tensor& hidden, const Tensor& weight,
    const OptT& bias, const Tensor& targets, const Tensor& lse, const Tensor& entropy, double temperature,
    int64_t ignore_index, bool need_hidden, bool need_weight, bool need_bias) {
  return linear_token_logprobs_bwd_meta(g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature,
                                        ignore_index, need_hidden, need_weight, need_bias);
}

}  // namespace

TORCH_LIBRARY(signalrl_native, m) {
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index, "
      "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "token_logprobs_bwd(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, "
      "Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float temperature, int ignore_index, bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_token_logprobs_bwd(Tensor grad_logprobs, Tensor grad_entropy, Tensor hidden, "
      "Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, "
      "float temperature, int ignore_index, bool need_hidden, bool need_weight, bool need_bias) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gae_fwd(Tensor rewards, Tensor values, Tensor mask, Tensor last_values, float gamma, "
      "float lam) -> (Tensor, Tensor)");
  m.def(
      "ppo_token_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor weights, "
      "Tensor mask, Tensor? ref_logprobs, Tensor? entropy, float clip_low, float clip_high, "
      "float? dual_clip, str kl_estimator, float kl_coef, float entropy_coef, "
      "float? log_ratio_clamp=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor weights, Tensor mask, "
      "float? clip) -> (Tensor, Tensor, Tensor)");
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, str estimator) -> Tensor");
  m.def(
      "kl_penalty_bwd(Tensor grad_kl, Tensor logprobs, Tensor ref_logprobs, str estimator) -> Tensor");
  m.def(
      "linear_ppo_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor old_logprobs, "
      "Tensor advantages, Tensor weights, Tensor mask, Tensor? ref_logprobs, float temperature, "
      "int ignore_index, float clip_low, float clip_high, float? dual_clip, str kl_estimator, "
      "float kl_coef, float entropy_coef, float? log_ratio_clamp=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ppo_bwd(Tensor grad_loss, Tensor g_lp, Tensor g_ent, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, "
      "bool need_hidden, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(signalrl_native, CPU, m) {
  m.impl("token_logprobs_fwd", &signalrl::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &signalrl::token_logprobs_bwd);
  m.impl("linear_token_logprobs_fwd", &signalrl::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &signalrl::linear_token_logprobs_bwd);
  m.impl("gae_fwd", &signalrl::gae_fwd);
  m.impl("ppo_token_fwd", &signalrl::ppo_token_fwd);
  m.impl("value_loss_fwd", &signalrl::value_loss_fwd);
  m.impl("kl_penalty_fwd", &signalrl::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &signalrl::kl_penalty_bwd);
  m.impl("linear_ppo_fwd", &signalrl::linear_ppo_fwd);
  m.impl("linear_ppo_bwd", &signalrl::linear_ppo_bwd);
}

TORCH_LIBRARY_IMPL(signalrl_native, Meta, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_meta);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_meta);
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd_meta);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd_meta);
  m.impl("gae_fwd", &gae_fwd_meta);
  m.impl("ppo_token_fwd", &ppo_token_fwd_meta);
  m.impl("value_loss_fwd", &value_loss_fwd_meta);
  m.impl("kl_penalty_fwd", &kl_penalty_fwd_meta);
  m.impl("kl_penalty_bwd", &kl_penalty_bwd_meta);
  m.impl("linear_ppo_fwd", &linear_ppo_fwd_meta);
  m.impl("linear_ppo_bwd", &linear_ppo_bwd_meta);
}

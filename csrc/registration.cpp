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
  return {at::empty({N}, f32), at::empty({with_entropy ? N : 0}, f32), at::empty({N}, f32)};
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
  return {at::empty({N}, f32), at::empty({with_entropy ? N : 0}, f32), at::empty({N}, f32)};
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
}

TORCH_LIBRARY_IMPL(signalrl_native, CPU, m) {
  m.impl("token_logprobs_fwd", &signalrl::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &signalrl::token_logprobs_bwd);
  m.impl("linear_token_logprobs_fwd", &signalrl::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &signalrl::linear_token_logprobs_bwd);
  m.impl("gae_fwd", &signalrl::gae_fwd);
}

TORCH_LIBRARY_IMPL(signalrl_native, Meta, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_meta);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_meta);
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd_meta);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd_meta);
  m.impl("gae_fwd", &gae_fwd_meta);
}

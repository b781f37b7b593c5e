// Entry points of the native CPU kernels (schemas in csrc/registration.cpp; contract in
// docs/backends.md). All take 1-D/2-D tensors; log-prob outputs are float32.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace signalrl {

// family logprobs
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& targets, double temperature,
    int64_t ignore_index, bool with_entropy);

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& targets,
                              const at::Tensor& lse, const at::Tensor& entropy,
                              double temperature, int64_t ignore_index);

// family linear_logprobs
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index,
    bool need_hidden, bool need_weight, bool need_bias);

// family gae
std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, const at::Tensor& last_values,
                                           double gamma, double lam);

// helpers shared by the kernel files (defined in logprobs.cpp)
namespace detail {
inline bool is_empty(const at::Tensor& t) { return !t.defined() || t.numel() == 0; }

// Checks the [N, V] float32/bfloat16/float16 logits and [N] integer targets of a log-prob kernel.
void check_logits_targets(const char* fn, const at::Tensor& logits, const at::Tensor& targets);

// Checks a 1-D float32 tensor of length n (or, if allow_empty, numel() == 0).
void check_vec_f32(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                   bool allow_empty);
}  // namespace detail

}  // namespace signalrl

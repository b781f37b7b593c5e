// Entry points of the native CPU kernels (each .cpp registers its own with TORCH_LIBRARY_IMPL(signalrl, CPU);
// the schemas are the torch.library ops of signalrl/ops/<family>.py; contract in
// docs/backends.md). All take 1-D/2-D tensors; log-prob outputs are float32.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

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

// family ppo: per-token PPO epilogue, clipped value loss (csrc/cpu/ppo.cpp).
// The mask selects: per-token inputs are read as 0 where mask == 0, whatever they hold.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_token_fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& weights, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& entropy, double clip_low, double clip_high,
    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef, double entropy_coef,
    std::optional<double> log_ratio_clamp);

std::tuple<at::Tensor, at::Tensor, at::Tensor> value_loss_fwd(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const at::Tensor& weights, const at::Tensor& mask, std::optional<double> clip);

// family kl: the KL estimators on [N] vectors (csrc/cpu/kl.cpp)
at::Tensor kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                          c10::string_view estimator);

at::Tensor kl_penalty_bwd(const at::Tensor& grad_kl, const at::Tensor& logprobs,
                          const at::Tensor& ref_logprobs, c10::string_view estimator);

// family linear_ppo (csrc/cpu/linear_ppo.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ppo_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& weights, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
    double temperature, int64_t ignore_index, double clip_low, double clip_high,
    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef, double entropy_coef,
    std::optional<double> log_ratio_clamp);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ppo_bwd(
    const at::Tensor& grad_loss, const at::Tensor& g_lp, const at::Tensor& g_ent, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index,
    bool need_hidden, bool need_weight, bool need_bias);

// helpers shared by the kernel files (defined in logprobs.cpp)
namespace detail {
inline bool is_empty(const at::Tensor& t) { return !t.defined() || t.numel() == 0; }

// Checks the [N, V] float32/bfloat16/float16 logits and [N] integer targets of a log-prob kernel.
void check_logits_targets(const char* fn, const at::Tensor& logits, const at::Tensor& targets);

// Checks a 1-D float32 tensor of length n (or, if allow_empty, numel() == 0).
void check_vec_f32(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                   bool allow_empty);
// lse crosses the forward/backward boundary as float64 [n] (see rowops.h: split_lse)
void check_lse(const char* fn, const at::Tensor& t, int64_t n);
// A CPU 1-D float tensor of length n read as contiguous float32 (converted from bfloat16/float16/float64).
at::Tensor vec_f32(const char* fn, const char* name, const at::Tensor& t, int64_t n);
}  // namespace detail

}  // namespace signalrl

// The native CPU kernels: each csrc/cpu/<family>.cpp defines its kernels and registers them for CPU with
// TORCH_LIBRARY_IMPL(signalrl, CPU); their schemas are the torch.library ops of signalrl/ops/<family>.py (contract:
// docs/backends.md). All take 1-D/2-D tensors; log-prob outputs are float32.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace signalrl {

// The kernels other kernel files call (linear_ppo.cpp composes them). Every other kernel is defined and registered
// in its own file only.

// family linear_logprobs (csrc/cpu/linear_logprobs.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index,
    bool need_hidden, bool need_weight, bool need_bias);

// the kept-logits plan of family linear_logprobs (same file): kept = the first keep_cols logits of each kept row
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_kept_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy, int64_t keep_cols);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_kept_bwd(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& kept,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    int64_t ignore_index, bool need_hidden, bool need_weight, bool need_bias);

// the frozen-head plan of family linear_logprobs (csrc/cpu/linear_logprobs_frozen.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_frozen_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy);

at::Tensor linear_token_logprobs_frozen_bwd(const at::Tensor& grad_logprobs, const at::Tensor& weight,
                                            const at::Tensor& targets, const at::Tensor& pw, const at::Tensor& coef,
                                            double temperature);

// family ppo: the per-token PPO epilogue (csrc/cpu/ppo.cpp). The mask selects: per-token inputs are read as 0 where
// mask == 0, whatever they hold.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_token_fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& weights, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& entropy, double clip_low, double clip_high,
    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef, double entropy_coef,
    std::optional<double> log_ratio_clamp);

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

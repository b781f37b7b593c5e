// family logprobs: per-token log-probs (+ entropy) from [N, V] logits, forward and backward.
// One streaming pass per row: each block of 2048 logits is read from memory once, converted
// to float32 in an L1-sized buffer (bf16/fp16), and folded into an online log-sum-exp.
// No [N, V] float32 temporary exists at any point, whatever the input dtype.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "rowops.h"

namespace signalrl {

namespace detail {

void check_logits_targets(const char* fn, const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu(), fn, ": expected CPU tensors, got logits on ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be [N, V], got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), fn,
              ": targets must be [N] with N = ", logits.size(0), ", got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, fn,
              ": targets must be int64, got ", targets.scalar_type());
}

void check_vec_f32(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                   bool allow_empty) {
  if (allow_empty && is_empty(t)) return;
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == n, fn, ": ", name,
              " must be [", n, "]", allow_empty ? " or empty" : "", ", got shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ",
              t.scalar_type());
}

void check_lse(const char* fn, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == n, fn, ": lse must be [", n, "], got shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.scalar_type() == at::kDouble, fn, ": lse must be float64 (the forward's), got ",
              t.scalar_type());
}

// a 1-D float tensor of length n read as contiguous float32 (converted from bfloat16/float16/float64)
at::Tensor vec_f32(const char* fn, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, fn, ": ", name, " must be [", n, "], got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be a float tensor, got ",
              t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

}  // namespace detail

namespace {

// single-thread cost of a row of V logits (ns; 2-core AMD EPYC, ~0.75 ns per logit forward or backward)
double row_ns(int64_t V) { return 0.75 * static_cast<double>(std::max<int64_t>(V, 1)); }

// A target outside [0, V) that is not ignore_index is never read: its log-prob is NaN and its
// log-prob gradient 0 (docs/backends.md, "Bad inputs"; the op layer refuses it on CPU first).
inline bool target_in_range(int64_t t, int64_t V) { return t >= 0 && t < V; }

template <typename scalar_t>
void logprobs_fwd_rows(const scalar_t* logits, const int64_t* targets, int64_t N, int64_t V,
                       float scale, int64_t ignore_index, float* logprobs, float* entropy,
                       double* lse) {
  parallel_work(0, N, row_ns(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<scalar_t, float>::value ? 0 : kRowBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = targets[i];
      if (t == ignore_index) {
        logprobs[i] = 0.0f;
        lse[i] = 0.0;
        if (entropy != nullptr) entropy[i] = 0.0f;
        continue;
      }
      const scalar_t* row = logits + i * V;
      OnlineLse acc;
      for (int64_t c = 0; c < V; c += kRowBlock) {
        const int64_t n = std::min(kRowBlock, V - c);
        acc.update(load_f32(row + c, n, buf.data()), n, scale, entropy != nullptr);
      }
      lse[i] = acc.lse(scale);
      logprobs[i] = target_in_range(t, V) ? acc.logprob(static_cast<float>(row[t]) * scale, scale)
                                          : std::numeric_limits<float>::quiet_NaN();
      if (entropy != nullptr) entropy[i] = acc.entropy();
    }
  });
}

template <typename scalar_t>
void logprobs_bwd_rows(const float* g_lp, const float* g_ent, const scalar_t* logits,
                       const int64_t* targets, const double* lse, const float* entropy, int64_t N,
                       int64_t V, float scale, int64_t ignore_index, scalar_t* grad) {
  parallel_work(0, N, row_ns(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<scalar_t, float>::value ? 0 : kRowBlock);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* out = grad + i * V;
      const int64_t t = targets[i];
      if (t == ignore_index) {
        std::fill(out, out + V, scalar_t(0));
        continue;
      }
      const scalar_t* row = logits + i * V;
      // d/dz_j = g_lp·(δ_jt − p_j) − g_H·p_j·(log p_j + H); d/dx = d/dz · scale
      const float gl = target_in_range(t, V) ? g_lp[i] : 0.0f;
      const float gh = g_ent != nullptr ? g_ent[i] : 0.0f;
      const float c0 = gl + (g_ent != nullptr ? gh * entropy[i] : 0.0f);
      const LseParts l = split_lse(lse[i]);
      for (int64_t c = 0; c < V; c += kRowBlock) {
        const int64_t n = std::min(kRowBlock, V - c);
        const float* x = load_f32(row + c, n, buf.data());
        float* o = f32_target(out + c, buf.data());
        vec_softmax_grad(x, n, scale, l.hi, l.lo, c0, gh, scale, o);
        if (t >= c && t < c + n) o[t - c] += scale * gl;
        store_f32(o, n, out + c);
      }
    }
  });
}

at::Tensor targets_i64(const at::Tensor& targets) { return targets.to(at::kLong).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(
    const at::Tensor& logits_in, const at::Tensor& targets_in, double temperature,
    int64_t ignore_index, bool with_entropy) {
  const char* fn = "token_logprobs_fwd";
  detail::check_logits_targets(fn, logits_in, targets_in);
  TORCH_CHECK(temperature > 0, fn, ": temperature must be > 0, got ", temperature);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_i64(targets_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({N}, f32);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, f32);
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kDouble));
  if (N == 0) return {logprobs, entropy, lse};
  TORCH_CHECK(V > 0, fn, ": logits must have V >= 1 columns");
  const float scale = static_cast<float>(1.0 / temperature);
  float* ent = with_entropy ? entropy.data_ptr<float>() : nullptr;
  SIGNAL_DISPATCH_LOGITS(logits.scalar_type(), "signalrl", [&] {
    logprobs_fwd_rows<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), N, V,
                                scale, ignore_index, logprobs.data_ptr<float>(), ent,
                                lse.data_ptr<double>());
  });
  return {logprobs, entropy, lse};
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logprobs_in,
                              const at::Tensor& grad_entropy_in, const at::Tensor& logits_in,
                              const at::Tensor& targets_in, const at::Tensor& lse_in,
                              const at::Tensor& entropy_in, double temperature,
                              int64_t ignore_index) {
  const char* fn = "token_logprobs_bwd";
  detail::check_logits_targets(fn, logits_in, targets_in);
  TORCH_CHECK(temperature > 0, fn, ": temperature must be > 0, got ", temperature);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  detail::check_vec_f32(fn, "grad_logprobs", grad_logprobs_in, N, false);
  detail::check_lse(fn, lse_in, N);
  const bool has_ent = !detail::is_empty(grad_entropy_in);
  detail::check_vec_f32(fn, "grad_entropy", grad_entropy_in, N, true);
  if (has_ent) detail::check_vec_f32(fn, "entropy (needed with grad_entropy)", entropy_in, N, false);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_i64(targets_in);
  const at::Tensor g_lp = grad_logprobs_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor g_ent = has_ent ? grad_entropy_in.contiguous() : at::Tensor();
  const at::Tensor ent = has_ent ? entropy_in.contiguous() : at::Tensor();
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (N == 0 || V == 0) return grad;
  const float scale = static_cast<float>(1.0 / temperature);
  SIGNAL_DISPATCH_LOGITS(logits.scalar_type(), "signalrl", [&] {
    logprobs_bwd_rows<scalar_t>(g_lp.data_ptr<float>(),
                                has_ent ? g_ent.data_ptr<float>() : nullptr,
                                logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                                lse.data_ptr<double>(), has_ent ? ent.data_ptr<float>() : nullptr,
                                N, V, scale, ignore_index, grad.data_ptr<scalar_t>());
  });
  return grad;
}

namespace {

template <class T>
bool targets_bad(const T* t, int64_t n, int64_t V, int64_t ignore_index) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = t[i];
    bad |= (x < 0 || x >= V) && x != ignore_index;
  }
  return bad;
}

}  // namespace

// The op layer's check of targets (signalrl/ops/_validate.py, targets_in_range): true if one is neither a class
// index in [0, V) nor ignore_index. One pass, no temporaries; the op layer locates a bad target for its message.
at::Tensor targets_check(const at::Tensor& targets_in, int64_t V, int64_t ignore_index) {
  TORCH_CHECK(targets_in.device().is_cpu(), "targets_check: targets must be a CPU tensor");
  const auto dt = targets_in.scalar_type();
  TORCH_CHECK(dt == at::kLong || dt == at::kInt, "targets_check: targets must be int64 or int32, got ", dt);
  const at::Tensor t = targets_in.contiguous();
  const bool bad = dt == at::kLong ? targets_bad(t.data_ptr<int64_t>(), t.numel(), V, ignore_index)
                                   : targets_bad(t.data_ptr<int32_t>(), t.numel(), V, ignore_index);
  return at::scalar_tensor(bad, at::TensorOptions().dtype(at::kBool));
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/logprobs.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("token_logprobs_fwd", &signalrl::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &signalrl::token_logprobs_bwd);
  m.impl("targets_check", &signalrl::targets_check);  // schema: signalrl/ops/_validate.py
}

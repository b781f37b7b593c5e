// family linear_logprobs, the frozen-head plan (linear_token_logprobs_frozen_fwd): log-probs of logits = hidden @
// weight.T + bias when no gradient flows to weight or bias (a LoRA run's LM head), together with what the backward
// needs, so that the backward makes no pass over the vocabulary:
//
//   z = (h·Wᵀ + b)·s (s = 1/temperature),  p = softmax(z),
//   ∂ log p_t / ∂h = s·(W_t − Σ_j p_j·W_j) = s·(c·W_t − pw),  c = Σ_{j≠t} p_j,  pw = Σ_{j≠t} p_j·W_j.
//
// The forward computes pw ([N, H] float32) and c ([N] float32) beside the online log-sum-exp: each logits block
// becomes exp(z − running max) in place, the target's term is set aside, and the block is multiplied by its weight
// block (a second GEMM per block), the running sums being rescaled when the max grows, as flash attention does.
// Leaving the target out of both sums keeps a confident token's gradient accurate: W_t − Σ_j p_j·W_j would cancel
// when p_t is near 1, c·W_t − pw is a difference of two terms of the gradient's own size. Two GEMMs of N·V·H
// forward and none backward, where the trained-head plan makes one forward and two backward (recompute the logits,
// d hidden).
// Memory: the [N, H] float32 pw, which the backward turns into d hidden (the size of that gradient in float32), plus
// the group plan's scratch: one [rows, Vb] logits block per running group and per-group [rows, H] sums within
// kGroupBudget floats. The vocabulary groups are fixed and merged in group order: results do not depend on the
// number of threads. With with_entropy the entropy of each row comes too (its value; the plan gives no entropy
// gradient). Rows whose target is ignore_index get log-prob 0, pw 0 and c 0; a target outside [0, V) a NaN
// log-prob (its gradient is the caller's: no log-prob gradient).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "linear_logprobs_blocks.h"
#include "parallel.h"
#include "rowops.h"

namespace signalrl {

using namespace linear;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_frozen_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy) {
  const char* fn = "linear_token_logprobs_frozen_fwd";
  at::Tensor tgt;
  const LinearArgs a = prepare(fn, hidden, weight, bias, targets, tgt, temperature, ignore_index);
  TORCH_CHECK(a.H > 0, fn, ": hidden must have H >= 1 columns");
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logprobs = at::zeros({a.N}, f32);
  at::Tensor entropy = with_entropy ? at::zeros({a.N}, f32) : at::empty({0}, f32);
  at::Tensor pw = at::zeros({a.N, a.H}, f32);
  at::Tensor coef = at::zeros({a.N}, f32);
  if (a.Nv == 0) return {logprobs, entropy, pw, coef};
  float* lp = logprobs.data_ptr<float>();
  float* ent = with_entropy ? entropy.data_ptr<float>() : nullptr;
  float* pwp = pw.data_ptr<float>();
  float* cp = coef.data_ptr<float>();
  const int64_t* rows = a.valid_rows.data_ptr<int64_t>();
  const int64_t H = a.H;
  std::vector<OnlineLse> state;
  std::vector<float> z_target, s_other;  // s_other: the running Σ_{j≠t} exp(z_j − max) of (group, row)
  for (int64_t r0 = 0; r0 < a.Nv; r0 += kRows) {
    const int64_t nr = std::min(kRows, a.Nv - r0);
    const at::Tensor h_blk = hidden_block(a, r0, nr);
    // the group plan while its per-group [nr, H] sums fit the budget, else one sum and [nr, kVocab] blocks whose
    // GEMMs use every thread
    int64_t vb = group_block(nr);
    int64_t nblocks = (a.V + vb - 1) / vb;
    int64_t G = std::min({kGroups, nblocks, kGroupBudget / (nr * H)});
    if (G < 2) {
      G = 1;
      vb = std::min(kVocab, a.V);
      nblocks = (a.V + vb - 1) / vb;
    }
    const int64_t per_group = (nblocks + G - 1) / G;
    state.assign(G * nr, OnlineLse());
    z_target.assign(nr, 0.0f);
    s_other.assign(G * nr, 0.0f);
    at::Tensor acc = at::zeros({G, nr, H}, f32);

    // the blocks of group g into its running states, its Σ_{j≠t} and its sums acc_g (alpha: per-row rescale factors)
    auto run_group = [&](int64_t g, at::Tensor& scratch, std::vector<float>& alpha) {
      OnlineLse* st = state.data() + g * nr;
      float* so = s_other.data() + g * nr;
      at::Tensor acc_g = acc.select(0, g);
      for (int64_t blk = g * per_group; blk < std::min(nblocks, (g + 1) * per_group); ++blk) {
        const int64_t v0 = blk * vb, nv = std::min(vb, a.V - v0);
        const at::Tensor w_blk = weight_block(a, v0, nv);
        const at::Tensor z = logits_block(a, scratch, h_blk, w_blk, v0);
        float* zp = z.data_ptr<float>();
        auto rows_exp = [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            float* zr = zp + i * nv;
            const int64_t t = a.targets[rows[r0 + i]];
            const bool has_t = t >= v0 && t < v0 + nv;
            if (has_t) z_target[i] = zr[t - v0] * a.scale;
            float block_sum;  // z -> exp(z − running max), in place
            alpha[i] = st[i].update_exp(zr, nv, a.scale, with_entropy, zr, &block_sum);
            if (has_t) {  // the target's term leaves both sums; the rest re-summed (not block_sum − e_t: cancels)
              zr[t - v0] = 0.0f;
              block_sum = vec_sum(zr, nv);
            }
            so[i] = so[i] * alpha[i] + block_sum;
          }
        };
        if (G == 1) {
          at::parallel_for(0, nr, 16, rows_exp);
        } else {
          rows_exp(0, nr);
        }
        if (std::any_of(alpha.begin(), alpha.end(), [](float x) { return x != 1.0f; })) {
          acc_g.mul_(at::from_blob(alpha.data(), {nr, 1}, f32));
        }
        acc_g.addmm_(z, w_blk);
      }
    };
    if (G == 1) {
      at::Tensor scratch = at::empty({nr * vb}, f32);
      std::vector<float> alpha(nr, 1.0f);
      run_group(0, scratch, alpha);
    } else {
      const double group_ns = 2.0 * 2.0 * nr * H * vb * per_group * kGemmNsPerFlop;
      parallel_groups(G, group_ns, [&](const auto& next_group) {
        // worker threads do not inherit the caller's dispatch state: below autograd, as the kernel itself runs
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor scratch = at::empty({nr * vb}, f32);
        std::vector<float> alpha(nr, 1.0f);
        for (int64_t g; (g = next_group()) >= 0;) run_group(g, scratch, alpha);
      });
    }
    // merge the groups in group order, each weighted by exp((m_g − m)·s):
    // pw = Σ_g acc_g / Σ_g s_g,  c = Σ_g s_other_g / Σ_g s_g
    const float* accp = acc.data_ptr<float>();
    std::vector<float> w(G);
    for (int64_t i = 0; i < nr; ++i) {
      const OnlineLse tot = merged_row(state.data(), G, nr, i, a.scale);
      const int64_t row = rows[r0 + i];
      const int64_t t = a.targets[row];
      if (ent != nullptr) ent[row] = tot.entropy();
      if (t < 0 || t >= a.V) {  // NaN log-prob, no log-prob gradient: c and pw stay 0
        lp[row] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      lp[row] = tot.logprob(z_target[i], a.scale);
      const float inv_s = 1.0f / tot.s;
      float c = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const float mg = state[g * nr + i].m;
        w[g] = (mg == kNegInf ? 0.0f : std::exp((mg - tot.m) * a.scale)) * inv_s;
        c += w[g] * s_other[g * nr + i];
      }
      cp[row] = c;
      float* out = pwp + row * H;
      const float* src0 = accp + i * H;
      for (int64_t k = 0; k < H; ++k) out[k] = w[0] * src0[k];
      for (int64_t g = 1; g < G; ++g) {
        const float* src = accp + (g * nr + i) * H;
        const float wg = w[g];
        for (int64_t k = 0; k < H; ++k) out[k] += wg * src[k];
      }
    }
  }
  return {logprobs, entropy, pw, coef};
}

at::Tensor linear_token_logprobs_frozen_bwd(const at::Tensor& grad_logprobs, const at::Tensor& weight,
                                            const at::Tensor& targets, const at::Tensor& pw, const at::Tensor& coef,
                                            double temperature) {
  constexpr const char* fn = "linear_token_logprobs_frozen_bwd";
  TORCH_CHECK(pw.dim() == 2 && pw.scalar_type() == at::kFloat, fn, ": pw must be [N, H] float32, got ",
              pw.scalar_type(), " ", pw.sizes());
  const int64_t N = pw.size(0), H = pw.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H, fn, ": weight must be [V, ", H, "], got shape ",
              weight.sizes());
  detail::check_vec_f32(fn, "grad_logprobs", grad_logprobs, N, false);
  detail::check_vec_f32(fn, "coef", coef, N, false);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == N, fn, ": targets must be [", N, "], got shape ",
              targets.sizes());
  const at::Tensor t_i64 = targets.to(at::kLong).contiguous(), w = weight.contiguous();
  const at::Tensor g_t = grad_logprobs.contiguous(), c_t = coef.contiguous(), pw_t = pw.contiguous();
  at::Tensor grad = at::empty({N, H}, pw.options());
  const int64_t V = w.size(0);
  const int64_t* tp = t_i64.data_ptr<int64_t>();
  const float *gp = g_t.data_ptr<float>(), *cp = c_t.data_ptr<float>(), *pp = pw_t.data_ptr<float>();
  float* out = grad.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  SIGNAL_DISPATCH_LOGITS(w.scalar_type(), fn, [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    // d hidden_i = (c_i·W[t_i] − pw_i)·g_i / T; 0 on rows whose target is ignore_index or outside [0, V)
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t b, int64_t e) {
      std::vector<float> buf(H);
      for (int64_t i = b; i < e; ++i) {
        float* o = out + i * H;
        const int64_t t = tp[i];
        if (t < 0 || t >= V) {
          std::fill(o, o + H, 0.0f);
          continue;
        }
        const float* wr = load_f32(wp + t * H, H, buf.data());
        const float s = gp[i] * inv_t, c = cp[i];
        const float* pr = pp + i * H;
        for (int64_t k = 0; k < H; ++k) o[k] = (c * wr[k] - pr[k]) * s;
      }
    });
  });
  return grad;
}

}  // namespace signalrl

// The schema and fake of this op are signalrl/ops/linear_logprobs.py (torch.library); this is its CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("linear_token_logprobs_frozen_fwd", &signalrl::linear_token_logprobs_frozen_fwd);
  m.impl("linear_token_logprobs_frozen_bwd", &signalrl::linear_token_logprobs_frozen_bwd);
}

// family linear_logprobs: per-token log-probs (+ entropy) of logits = hidden @ weight.T + bias,
// without materializing the [N, V] logits. Rows whose target is ignore_index are dropped up front; a
// target outside [0, V) gives a NaN log-prob and no log-prob gradient (never an out-of-bounds read).
// The remaining rows are processed in blocks of kRows, the vocabulary in blocks of kVocab; each
// [kRows, kVocab] float32 logits block comes from one GEMM (at::mm, float32 accumulation) and is
// folded into a per-row online log-sum-exp. Memory: O(kRows·kVocab + (kRows + kVocab)·H) on top
// of inputs and outputs. The backward recomputes the blocks and turns each into d logits in place.
//
// Plan by shape. The vocabulary is cut into kGroups fixed groups of small blocks (a [rows, Vb] float32 block stays in
// L2 between its GEMM and the softmax pass); the groups run in parallel, one thread per group at a time, each GEMM
// single-threaded inside its task, so a call holds one parallel region rather than two per block, and small calls
// run on one thread (parallel.h). Forward: each group keeps its own online log-sum-exp per row; the groups are merged
// in group order. Backward (rows ≤ kRows, while kGroups partial d(hidden) fit kGroupBudget floats): d(weight) and
// d(bias) blocks are written straight into the outputs (disjoint per block), d(hidden) is summed per group and the
// groups added in order. Results do not depend on the number of threads. Otherwise (many rows and a large H) the
// backward runs [kRows, kVocab] blocks one after the other, each GEMM using every thread.
//
// The kept-logits plan (linear_token_logprobs_kept_fwd / _bwd): the forward also writes the first K raw logits of
// every kept row into a float32 [N, K] tensor the caller keeps for the backward, which then reads the blocks lying
// within those columns instead of recomputing them: one GEMM fewer over that part of the vocabulary (two instead of
// three when K = V). The caller picks K within the op's memory bound (signalrl/ops/linear_logprobs.py).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "linear_logprobs_blocks.h"
#include "parallel.h"
#include "rowops.h"

namespace signalrl {

using namespace linear;

namespace {

// The forward of both plans: (logprobs, entropy | empty, lse, kept), kept the float32 [N, keep_cols] logits of the
// kept-logits plan (the first keep_cols of each kept row), undefined when keep_cols is nullopt (the plain plan).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const char* fn, const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy,
    std::optional<int64_t> keep_cols) {
  at::Tensor tgt;
  const LinearArgs a = prepare(fn, hidden, weight, bias, targets, tgt, temperature, ignore_index);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor kept;
  if (keep_cols.has_value()) {
    TORCH_CHECK(*keep_cols >= 0 && *keep_cols <= a.V, fn, ": keep_cols must be in [0, V = ", a.V, "], got ",
                *keep_cols);
    kept = at::empty({a.N, *keep_cols}, f32);
  }
  at::Tensor logprobs = at::zeros({a.N}, f32);
  at::Tensor entropy = with_entropy ? at::zeros({a.N}, f32) : at::empty({0}, f32);
  at::Tensor lse = at::zeros({a.N}, hidden.options().dtype(at::kDouble));
  if (a.Nv == 0) return {logprobs, entropy, lse, kept};

  float* lp = logprobs.data_ptr<float>();
  float* ent = with_entropy ? entropy.data_ptr<float>() : nullptr;
  double* ls = lse.data_ptr<double>();
  const int64_t* rows = a.valid_rows.data_ptr<int64_t>();
  std::vector<OnlineLse> state;
  std::vector<float> z_target;
  for (int64_t r0 = 0; r0 < a.Nv; r0 += kRows) {
    const int64_t nr = std::min(kRows, a.Nv - r0);
    const at::Tensor h_blk = hidden_block(a, r0, nr);
    const int64_t vb = group_block(nr);
    const int64_t nblocks = (a.V + vb - 1) / vb;
    const int64_t G = std::min(kGroups, nblocks);
    const int64_t per_group = (nblocks + G - 1) / G;  // blocks per group
    state.assign(G * nr, OnlineLse());
    z_target.assign(nr, 0.0f);
    const double group_ns = 2.0 * nr * a.H * vb * per_group * kGemmNsPerFlop;
    parallel_groups(G, group_ns, [&](const auto& next_group) {
      // worker threads do not inherit the caller's dispatch state: below autograd, as the kernel itself runs
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor scratch = at::empty({nr * vb}, f32);
      for (int64_t g; (g = next_group()) >= 0;) {
        OnlineLse* st = state.data() + g * nr;
        for (int64_t blk = g * per_group; blk < std::min(nblocks, (g + 1) * per_group); ++blk) {
          const int64_t v0 = blk * vb, nv = std::min(vb, a.V - v0);
          const at::Tensor z = forward_block(a, scratch, kept, h_blk, weight_block(a, v0, nv), r0, v0);
          const float* zp = z.data_ptr<float>();
          const int64_t ld = z.stride(0);
          for (int64_t i = 0; i < nr; ++i) {
            const float* zr = zp + i * ld;
            st[i].update(zr, nv, a.scale, with_entropy);
            const int64_t t = a.targets[rows[r0 + i]];
            if (t >= v0 && t < v0 + nv) z_target[i] = zr[t - v0] * a.scale;
          }
        }
      }
    });
    for (int64_t i = 0; i < nr; ++i) {
      const OnlineLse acc = merged_row(state.data(), G, nr, i, a.scale);
      const int64_t row = rows[r0 + i];
      ls[row] = acc.lse(a.scale);
      const int64_t t = a.targets[row];
      lp[row] = (t >= 0 && t < a.V) ? acc.logprob(z_target[i], a.scale)
                                    : std::numeric_limits<float>::quiet_NaN();
      if (ent != nullptr) ent[row] = acc.entropy();
    }
  }
  return {logprobs, entropy, lse, kept};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy) {
  auto [lp, ent, lse, kept] = forward("linear_token_logprobs_fwd", hidden, weight, bias, targets, temperature,
                                      ignore_index, with_entropy, std::nullopt);
  return {lp, ent, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_kept_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy, int64_t keep_cols) {
  return forward("linear_token_logprobs_kept_fwd", hidden, weight, bias, targets, temperature, ignore_index,
                 with_entropy, keep_cols);
}

namespace {

// float32 rows: row i at data + i·stride
struct Rows {
  const float* data;
  int64_t stride;
};

// Rows [r0, r0+nr) of the logits block at vocab [v0, v0+nv): kept's columns when the block lies within them, else
// recomputed into z. z then receives d loss / d logits.
Rows backward_block(const LinearArgs& a, at::Tensor& z, const at::Tensor& kept, const at::Tensor& h_blk,
                    const at::Tensor& w_blk, int64_t r0, int64_t v0) {
  if (block_is_kept(kept, v0, w_blk.size(0))) {
    return {kept.data_ptr<float>() + r0 * kept.stride(0) + v0, kept.stride(0)};
  }
  logits_into(a, z, h_blk, w_blk, v0);
  return {z.data_ptr<float>(), z.size(1)};
}

// The backward of both plans (kept: the forward's, undefined for none).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const char* fn, const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse_in, const at::Tensor& entropy_in, double temperature, int64_t ignore_index,
    bool need_hidden, bool need_weight, bool need_bias, const at::Tensor& kept) {
  at::Tensor tgt;
  const LinearArgs a = prepare(fn, hidden, weight, bias, targets, tgt, temperature, ignore_index);
  TORCH_CHECK(!kept.defined() || (kept.device().is_cpu() && kept.scalar_type() == at::kFloat && kept.dim() == 2 &&
                                  kept.size(0) == a.N && kept.size(1) <= a.V && kept.stride(1) == 1),
              fn, ": kept must be the forward's float32 [N, K] logits with N = ", a.N, " and K <= V = ", a.V,
              ", got ", kept.scalar_type(), " of shape ", kept.sizes());
  need_bias = need_bias && a.bias_f32.defined();
  detail::check_vec_f32(fn, "grad_logprobs", grad_logprobs, a.N, false);
  detail::check_lse(fn, lse_in, a.N);
  const bool has_ent = !detail::is_empty(grad_entropy);
  detail::check_vec_f32(fn, "grad_entropy", grad_entropy, a.N, true);
  if (has_ent) detail::check_vec_f32(fn, "entropy (needed with grad_entropy)", entropy_in, a.N, false);

  at::Tensor grad_hidden = need_hidden ? at::zeros_like(a.hidden) : empty_f32(hidden);
  at::Tensor grad_weight = need_weight ? at::empty_like(a.weight) : empty_f32(hidden);
  at::Tensor grad_bias = need_bias ? at::empty({a.V}, bias->options()) : empty_f32(hidden);
  if (!(need_hidden || need_weight || need_bias)) return {grad_hidden, grad_weight, grad_bias};
  if (a.Nv == 0) {
    if (need_weight) grad_weight.zero_();
    if (need_bias) grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }

  // per kept row: lse, c0 = g_lp + g_H·H, c1 = g_H, g_lp, target
  const int64_t Nv = a.Nv;
  const int64_t* rows = a.valid_rows.data_ptr<int64_t>();
  const at::Tensor g_lp_t = grad_logprobs.contiguous(), lse_t = lse_in.contiguous();
  const at::Tensor g_ent_t = has_ent ? grad_entropy.contiguous() : at::Tensor();
  const at::Tensor ent_t = has_ent ? entropy_in.contiguous() : at::Tensor();
  std::vector<LseParts> r_lse(Nv);
  std::vector<float> r_c0(Nv), r_c1(Nv), r_gl(Nv);
  std::vector<int64_t> r_tgt(Nv);
  for (int64_t k = 0; k < Nv; ++k) {
    const int64_t i = rows[k];
    r_lse[k] = split_lse(lse_t.data_ptr<double>()[i]);
    r_gl[k] = (a.targets[i] >= 0 && a.targets[i] < a.V) ? g_lp_t.data_ptr<float>()[i] : 0.0f;
    r_c1[k] = has_ent ? g_ent_t.data_ptr<float>()[i] : 0.0f;
    r_c0[k] = r_gl[k] + (has_ent ? r_c1[k] * ent_t.data_ptr<float>()[i] : 0.0f);
    r_tgt[k] = a.targets[i];
  }

  const auto f32 = hidden.options().dtype(at::kFloat);
  // the group plan (see the top of this file) where its d(hidden) partials fit the budget
  const int64_t vbg = group_block(Nv);
  const int64_t nblocks_g = (a.V + vbg - 1) / vbg;
  const int64_t G = std::min({kGroups, nblocks_g, need_hidden ? kGroupBudget / (Nv * a.H) : kGroups});
  if (Nv <= kRows && G >= 2) {
    const at::Tensor h_all = hidden_block(a, 0, Nv);
    const int64_t per_group = (nblocks_g + G - 1) / G;
    at::Tensor gh_part = need_hidden ? at::zeros({G, Nv, a.H}, f32) : at::Tensor();
    const bool gw_direct = need_weight && grad_weight.scalar_type() == at::kFloat;
    const double group_ns = 3.0 * 2.0 * Nv * a.H * vbg * per_group * kGemmNsPerFlop;
    parallel_groups(G, group_ns, [&](const auto& next_group) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
      at::Tensor scratch = at::empty({Nv * vbg}, f32);
      at::Tensor gw_tmp = need_weight && !gw_direct ? at::empty({vbg, a.H}, f32) : at::Tensor();
      for (int64_t g; (g = next_group()) >= 0;) {
        at::Tensor gh_g = need_hidden ? gh_part.select(0, g) : at::Tensor();
        for (int64_t blk = g * per_group; blk < std::min(nblocks_g, (g + 1) * per_group); ++blk) {
          const int64_t v0 = blk * vbg, nv = std::min(vbg, a.V - v0);
          const at::Tensor w_blk = weight_block(a, v0, nv);
          at::Tensor z = scratch.narrow(0, 0, Nv * nv).view({Nv, nv});
          const Rows logits = backward_block(a, z, kept, h_all, w_blk, 0, v0);
          float* zp = z.data_ptr<float>();
          for (int64_t k = 0; k < Nv; ++k) {  // logits -> d loss / d logits
            float* zr = zp + k * nv;
            vec_softmax_grad(logits.data + k * logits.stride, nv, a.scale, r_lse[k].hi, r_lse[k].lo, r_c0[k], r_c1[k], a.scale, zr);
            const int64_t t = r_tgt[k];
            if (t >= v0 && t < v0 + nv) zr[t - v0] += a.scale * r_gl[k];
          }
          if (need_hidden) gh_g.addmm_(z, w_blk);
          if (need_weight) {
            if (gw_direct) {
              at::Tensor gw = grad_weight.narrow(0, v0, nv);
              at::mm_out(gw, z.t(), h_all);
            } else {
              at::Tensor gw = gw_tmp.narrow(0, 0, nv);
              at::mm_out(gw, z.t(), h_all);
              grad_weight.narrow(0, v0, nv).copy_(gw);
            }
          }
          if (need_bias) grad_bias.narrow(0, v0, nv).copy_(z.sum(0));
        }
      }
    });
    if (need_hidden) {
      at::Tensor gh = gh_part.select(0, 0);
      for (int64_t g = 1; g < G; ++g) gh.add_(gh_part.select(0, g));  // in group order
      if (Nv == a.N) {
        grad_hidden.copy_(gh);
      } else {
        grad_hidden.index_copy_(0, a.valid_rows, gh.to(grad_hidden.scalar_type()));
      }
    }
    return {grad_hidden, grad_weight, grad_bias};
  }
  // float32 accumulator for d hidden over the kept rows (accumulates over vocab blocks); the
  // output itself when it is float32 and no row was dropped
  const bool gh_direct = need_hidden && Nv == a.N && grad_hidden.scalar_type() == at::kFloat;
  at::Tensor gh_acc = gh_direct ? grad_hidden
                      : need_hidden ? at::zeros({Nv, a.H}, f32)
                                    : at::Tensor();
  at::Tensor scratch = at::empty({std::min(kRows, Nv) * std::min(kVocab, a.V)}, f32);
  const bool one_row_block = Nv <= kRows;
  const at::Tensor h_all = one_row_block ? hidden_block(a, 0, Nv) : at::Tensor();
  for (int64_t v0 = 0; v0 < a.V; v0 += kVocab) {
    const int64_t nv = std::min(kVocab, a.V - v0);
    const at::Tensor w_blk = weight_block(a, v0, nv);
    at::Tensor gw_acc = need_weight ? at::zeros({nv, a.H}, f32) : at::Tensor();
    at::Tensor gb_acc = need_bias ? at::zeros({nv}, f32) : at::Tensor();
    for (int64_t r0 = 0; r0 < Nv; r0 += kRows) {
      const int64_t nr = std::min(kRows, Nv - r0);
      const at::Tensor h_blk = one_row_block ? h_all : hidden_block(a, r0, nr);
      at::Tensor z = scratch.narrow(0, 0, nr * nv).view({nr, nv});
      const Rows logits = backward_block(a, z, kept, h_blk, w_blk, r0, v0);
      float* zp = z.data_ptr<float>();
      // logits -> d loss / d logits
      at::parallel_for(0, nr, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t k = r0 + i;
          float* zr = zp + i * nv;
          vec_softmax_grad(logits.data + i * logits.stride, nv, a.scale, r_lse[k].hi, r_lse[k].lo, r_c0[k], r_c1[k], a.scale, zr);
          const int64_t t = r_tgt[k];
          if (t >= v0 && t < v0 + nv) zr[t - v0] += a.scale * r_gl[k];
        }
      });
      if (need_hidden) {
        at::Tensor gh = gh_acc.narrow(0, r0, nr);
        gh.addmm_(z, w_blk);
      }
      if (need_weight) gw_acc.addmm_(z.t(), h_blk);
      if (need_bias) gb_acc.add_(z.sum(0));
    }
    if (need_weight) grad_weight.narrow(0, v0, nv).copy_(gw_acc);
    if (need_bias) grad_bias.narrow(0, v0, nv).copy_(gb_acc);
  }
  if (need_hidden && !gh_direct) {
    if (Nv == a.N) {
      grad_hidden.copy_(gh_acc);
    } else {
      grad_hidden.index_copy_(0, a.valid_rows, gh_acc.to(grad_hidden.scalar_type()));
    }
  }
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, int64_t ignore_index, bool need_hidden,
    bool need_weight, bool need_bias) {
  return backward("linear_token_logprobs_bwd", grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse,
                  entropy, temperature, ignore_index, need_hidden, need_weight, need_bias, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_kept_bwd(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& kept,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    int64_t ignore_index, bool need_hidden, bool need_weight, bool need_bias) {
  return backward("linear_token_logprobs_kept_bwd", grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse,
                  entropy, temperature, ignore_index, need_hidden, need_weight, need_bias, kept);
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/logprobs.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &signalrl::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &signalrl::linear_token_logprobs_bwd);
  m.impl("linear_token_logprobs_kept_fwd", &signalrl::linear_token_logprobs_kept_fwd);
  m.impl("linear_token_logprobs_kept_bwd", &signalrl::linear_token_logprobs_kept_bwd);
}

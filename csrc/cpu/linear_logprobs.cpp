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
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "rowops.h"

namespace signalrl {

namespace {

constexpr int64_t kRows = 1024;
constexpr int64_t kVocab = 1024;
constexpr int64_t kGroups = 16;             // fixed vocab groups of the group plan (not the number of threads)
constexpr int64_t kTileFloats = 64 * 1024;  // a group's logits block: rows × Vb ≈ 256 KiB
constexpr int64_t kGroupBudget = 256 * 1024;  // floats of all per-group d(hidden) partials (1 MiB)
constexpr double kGemmNsPerFlop = 1.0 / 80.0;     // single-thread float32 GEMM ≈ 80 GFLOP/s (2-core AMD EPYC)

// vocab block of the group plan for nr rows: a multiple of 64 in [64, 1024]
int64_t group_block(int64_t nr) {
  return std::min<int64_t>(1024, std::max<int64_t>(64, kTileFloats / std::max<int64_t>(nr, 1) / 64 * 64));
}

struct LinearArgs {
  at::Tensor hidden, weight, bias_f32, valid_rows;  // valid_rows: int64 [Nv] row indices
  const int64_t* targets = nullptr;
  int64_t N = 0, H = 0, V = 0, Nv = 0;
  float scale = 1.0f;
};

LinearArgs prepare(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                   at::Tensor& targets_i64, double temperature, int64_t ignore_index) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), fn,
              ": expected CPU tensors, got hidden on ", hidden.device(), " and weight on ",
              weight.device());
  TORCH_CHECK(hidden.dim() == 2, fn, ": hidden must be [N, H], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), fn,
              ": weight must be [V, H] with H = ", hidden.size(1), ", got shape ", weight.sizes());
  for (const auto* t : {&hidden, &weight}) {
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
                ": hidden and weight must be float32, bfloat16 or float16, got ", dt);
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), fn,
              ": targets must be [N] with N = ", hidden.size(0), ", got shape ", targets.sizes());
  TORCH_CHECK(temperature > 0, fn, ": temperature must be > 0, got ", temperature);
  LinearArgs a;
  a.N = hidden.size(0);
  a.H = hidden.size(1);
  a.V = weight.size(0);
  TORCH_CHECK(a.V > 0, fn, ": weight must have V >= 1 rows");
  a.hidden = hidden.contiguous();
  a.weight = weight.contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.V, fn, ": bias must be [", a.V,
                "], got shape ", bias->sizes());
    a.bias_f32 = bias->to(at::kFloat).contiguous();
  }
  targets_i64 = targets.to(at::kLong).contiguous();
  a.targets = targets_i64.data_ptr<int64_t>();
  std::vector<int64_t> rows;
  rows.reserve(a.N);
  for (int64_t i = 0; i < a.N; ++i) {
    const int64_t t = a.targets[i];
    if (t == ignore_index) continue;
    rows.push_back(i);  // a target outside [0, V) is kept but never read: NaN log-prob, no log-prob gradient
  }
  a.Nv = static_cast<int64_t>(rows.size());
  a.valid_rows = at::empty({a.Nv}, targets_i64.options());
  std::copy(rows.begin(), rows.end(), a.valid_rows.data_ptr<int64_t>());
  a.scale = static_cast<float>(1.0 / temperature);
  return a;
}

// float32 [nr, H] rows r0 .. r0+nr of the kept rows (a view when nothing is dropped and H is f32)
at::Tensor hidden_block(const LinearArgs& a, int64_t r0, int64_t nr) {
  if (a.Nv == a.N) return a.hidden.narrow(0, r0, nr).to(at::kFloat).contiguous();
  return a.hidden.index_select(0, a.valid_rows.narrow(0, r0, nr)).to(at::kFloat);
}

at::Tensor weight_block(const LinearArgs& a, int64_t v0, int64_t nv) {
  return a.weight.narrow(0, v0, nv).to(at::kFloat).contiguous();
}

// z[nr, nv] = h_blk @ w_blk.T (+ bias[v0 : v0+nv]), float32, written into the scratch buffer
at::Tensor logits_block(const LinearArgs& a, at::Tensor& scratch, const at::Tensor& h_blk,
                        const at::Tensor& w_blk, int64_t v0) {
  const int64_t nr = h_blk.size(0), nv = w_blk.size(0);
  at::Tensor z = scratch.narrow(0, 0, nr * nv).view({nr, nv});
  if (a.bias_f32.defined()) {
    at::addmm_out(z, a.bias_f32.narrow(0, v0, nv), h_blk, w_blk.t());
  } else {
    at::mm_out(z, h_blk, w_blk.t());
  }
  return z;
}

at::Tensor empty_f32(const at::Tensor& like) {
  return at::empty({0}, like.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool with_entropy) {
  const char* fn = "linear_token_logprobs_fwd";
  at::Tensor tgt;
  const LinearArgs a = prepare(fn, hidden, weight, bias, targets, tgt, temperature, ignore_index);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logprobs = at::zeros({a.N}, f32);
  at::Tensor entropy = with_entropy ? at::zeros({a.N}, f32) : at::empty({0}, f32);
  at::Tensor lse = at::zeros({a.N}, hidden.options().dtype(at::kDouble));
  if (a.Nv == 0) return {logprobs, entropy, lse};

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
    parallel_region(0, G, group_ns, [&](int64_t g0, int64_t g1) {
      // worker threads do not inherit the caller's dispatch state: below autograd, as the kernel itself runs
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor scratch = at::empty({nr * vb}, f32);
      for (int64_t g = g0; g < g1; ++g) {
        OnlineLse* st = state.data() + g * nr;
        for (int64_t blk = g * per_group; blk < std::min(nblocks, (g + 1) * per_group); ++blk) {
          const int64_t v0 = blk * vb, nv = std::min(vb, a.V - v0);
          const at::Tensor z = logits_block(a, scratch, h_blk, weight_block(a, v0, nv), v0);
          const float* zp = z.data_ptr<float>();
          for (int64_t i = 0; i < nr; ++i) {
            const float* zr = zp + i * nv;
            st[i].update(zr, nv, a.scale, with_entropy);
            const int64_t t = a.targets[rows[r0 + i]];
            if (t >= v0 && t < v0 + nv) z_target[i] = zr[t - v0] * a.scale;
          }
        }
      }
    });
    for (int64_t i = 0; i < nr; ++i) {
      OnlineLse acc = state[i];
      for (int64_t g = 1; g < G; ++g) acc.merge(state[g * nr + i], a.scale);
      const int64_t row = rows[r0 + i];
      ls[row] = acc.lse(a.scale);
      const int64_t t = a.targets[row];
      lp[row] = (t >= 0 && t < a.V) ? acc.logprob(z_target[i], a.scale)
                                    : std::numeric_limits<float>::quiet_NaN();
      if (ent != nullptr) ent[row] = acc.entropy();
    }
  }
  return {logprobs, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse_in, const at::Tensor& entropy_in, double temperature,
    int64_t ignore_index, bool need_hidden, bool need_weight, bool need_bias) {
  const char* fn = "linear_token_logprobs_bwd";
  at::Tensor tgt;
  const LinearArgs a = prepare(fn, hidden, weight, bias, targets, tgt, temperature, ignore_index);
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
    parallel_region(0, G, group_ns, [&](int64_t g0, int64_t g1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
      at::Tensor scratch = at::empty({Nv * vbg}, f32);
      at::Tensor gw_tmp = need_weight && !gw_direct ? at::empty({vbg, a.H}, f32) : at::Tensor();
      for (int64_t g = g0; g < g1; ++g) {
        at::Tensor gh_g = need_hidden ? gh_part.select(0, g) : at::Tensor();
        for (int64_t blk = g * per_group; blk < std::min(nblocks_g, (g + 1) * per_group); ++blk) {
          const int64_t v0 = blk * vbg, nv = std::min(vbg, a.V - v0);
          const at::Tensor w_blk = weight_block(a, v0, nv);
          at::Tensor z = logits_block(a, scratch, h_all, w_blk, v0);
          float* zp = z.data_ptr<float>();
          for (int64_t k = 0; k < Nv; ++k) {  // z -> d loss / d logits (in place)
            float* zr = zp + k * nv;
            vec_softmax_grad(zr, nv, a.scale, r_lse[k].hi, r_lse[k].lo, r_c0[k], r_c1[k], a.scale, zr);
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
      at::Tensor z = logits_block(a, scratch, h_blk, w_blk, v0);
      float* zp = z.data_ptr<float>();
      // z -> d loss / d logits (in place)
      at::parallel_for(0, nr, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t k = r0 + i;
          float* zr = zp + i * nv;
          vec_softmax_grad(zr, nv, a.scale, r_lse[k].hi, r_lse[k].lo, r_c0[k], r_c1[k], a.scale, zr);
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

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/logprobs.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &signalrl::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &signalrl::linear_token_logprobs_bwd);
}

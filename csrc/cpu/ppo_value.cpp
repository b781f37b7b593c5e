// family ppo, the clipped value loss (value_loss_fwd): loss, per-token gradient and statistics in one pass over the
// tokens, after a pass over the mask alone (its value check, and Σ m for the token-mean weights). The math is that
// of signalrl/reference/ppo.py (value_loss) and of the Triton kernel (signalrl/kernels/ppo.py): per-token values in
// float32 as the reference computes them, the max's tie splitting the gradient in halves, clamp passing it on its
// closed interval; the mask selects (a masked position reads as 0 whatever it holds).
//
// The explained variance needs Var(R) and Var(R − v) about means known only at the end. Each sub-block of kSubBlock
// tokens (epilogue.h) is summed first, then — still in L1 — its squared deviations are summed about its own mean;
// the sub-blocks' (count, Σ, M2) are merged in order with Chan et al.'s pairwise update in float64 (a two-pass
// variance's accuracy, with one read of the inputs from memory). Chunks of kChunk tokens are merged the same way,
// in order: no result depends on the number of threads.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "epilogue.h"
#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace signalrl {

namespace {

using detail::vec_f32;
using namespace epilogue;

// single-thread cost of one chunk of kChunk tokens (ns; 2-core AMD EPYC)
constexpr double kValueChunkNs = 4096 * 1.2;

// a chunk's row: Σ w·ℓ, Σ m, Σ m·clipped, Σ m·v, Σ m·R, and the M2 (Σ m·(x − mean)²) of R and of R − v
enum ValueCol { VLOSS, VCNT, VCLIP, SV, SR, M2R, M2E, VNCOL };

struct ValueArgs {
  const float *v, *old, *ret, *w, *m;
  float* g_v;
  float clip;
  float wdiv;  // w == nullptr: token-mean weights m / wdiv
};

// Chan et al.: fold the moments (n, Σ m·R, Σ m·v, M2 of R, M2 of R − v) of a later group b into a's
SIGNAL_INLINE void merge_moments(double* a, double n, double sr, double sv, double m2r, double m2e) {
  if (n > 0 && a[VCNT] > 0) {
    const double na = a[VCNT], t = na + n;
    const double dr = sr / n - a[SR] / na;
    const double de = (sr - sv) / n - (a[SR] - a[SV]) / na;
    a[M2R] += m2r + dr * dr * (na * n / t);
    a[M2E] += m2e + de * de * (na * n / t);
  } else {
    a[M2R] += m2r;
    a[M2E] += m2e;
  }
  a[VCNT] += n;
  a[SR] += sr;
  a[SV] += sv;
}

// tokens [b, e) (one chunk): gradient into g_v, the chunk's row[VNCOL]
template <bool HAS_CLIP, bool HAS_W>
SIGNAL_MULTIVERSION void value_chunk(const ValueArgs& p, int64_t b, int64_t e, double* row) {
  using namespace simd;
  for (int k = 0; k < VNCOL; ++k) row[k] = 0.0;
  const vf zero = vf{}, half = splat(0.5f), c_hi = splat(p.clip), c_lo = -c_hi, wdiv = splat(p.wdiv);
  const float* const in[5] = {p.m, p.w, p.v, p.ret, HAS_CLIP ? p.old : nullptr};
  float* const out[1] = {p.g_v};
  const float* const in_sq[3] = {p.m, p.v, p.ret};
  float* const no_out[1] = {nullptr};
  for_sub_blocks(b, e, [&](int64_t sb, int64_t se) __attribute__((always_inline)) {
    vf loss_s = zero, cnt_s = zero, clip_s = zero, sv_s = zero, sr_s = zero;
    for_vectors<5, 1>(sb, se, in, out, [&](const float* const* x, float* const* y, int64_t i)
                                           __attribute__((always_inline)) {
      const vf mi = load(x[0] + i);
      const vf wi = HAS_W ? load(x[1] + i) : mi / wdiv;  // token-mean weights: as token_weights divides
      const vi sel = mi != zero;
      const vf vi_ = select(sel, load(x[2] + i), zero), ri = select(sel, load(x[3] + i), zero);
      const vf diff = vi_ - ri;
      const vf err = diff * diff;
      vf loss, g;
      if constexpr (HAS_CLIP) {
        const vf oi = select(sel, load(x[4] + i), zero);
        const vf dv = vi_ - oi;
        const vf dc = (oi + nan_clamp(dv, c_lo, c_hi)) - ri;
        const vf err_c = dc * dc;
        const vf g_c = select((dv >= c_lo) & (dv <= c_hi), dc, zero);
        loss = half * nan_max(err, err_c);
        g = select(err > err_c, diff, select(err_c > err, g_c, half * (diff + g_c)));
        clip_s += select((err_c > err) & ((dv < c_lo) | (dv > c_hi)), mi, zero);
      } else {
        loss = half * err;
        g = diff;
      }
      store(y[0] + i, wi * g);
      loss_s += wi * loss;
      cnt_s += mi;
      sv_s += mi * vi_;
      sr_s += mi * ri;
    });
    row[VLOSS] += lanes_total(to_d(loss_s));
    row[VCLIP] += lanes_total(to_d(clip_s));
    const double n = lanes_total(to_d(cnt_s)), sr = lanes_total(to_d(sr_s)), sv = lanes_total(to_d(sv_s));
    double m2r = 0.0, m2e = 0.0;
    if (n > 0) {  // squared deviations about the sub-block's own means, its tokens still in L1
      const float cr_f = static_cast<float>(sr / n), ce_f = static_cast<float>((sr - sv) / n);
      const vf cr = splat(cr_f), ce = splat(ce_f);
      vf dr1 = zero, dr2 = zero, de1 = zero, de2 = zero;
      for_vectors<3, 1>(sb, se, in_sq, no_out, [&](const float* const* x, float* const*, int64_t i)
                                                   __attribute__((always_inline)) {
        const vf mi = load(x[0] + i);
        const vi sel = mi != zero;
        const vf vi_ = select(sel, load(x[1] + i), zero), ri = select(sel, load(x[2] + i), zero);
        const vf dr = ri - cr, de = (ri - vi_) - ce;
        dr1 += mi * dr;
        dr2 += mi * dr * dr;
        de1 += mi * de;
        de2 += mi * de * de;
      });
      // Σ m·(x − mean)² = Σ m·(x − c)² − (Σ m·(x − c))² / n for the rounded center c
      const double r1 = lanes_total(to_d(dr1)), e1 = lanes_total(to_d(de1));
      m2r = std::max(lanes_total(to_d(dr2)) - r1 * r1 / n, 0.0);
      m2e = std::max(lanes_total(to_d(de2)) - e1 * e1 / n, 0.0);
    }
    merge_moments(row, n, sr, sv, m2r, m2e);
  });
}

using ValueChunkFn = void (*)(const ValueArgs&, int64_t, int64_t, double*);

ValueChunkFn value_chunk_fn(bool has_clip, bool has_w) {
  if (has_w) return has_clip ? &value_chunk<true, true> : &value_chunk<false, true>;
  return has_clip ? &value_chunk<true, false> : &value_chunk<false, false>;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> value_loss_fwd(
    const at::Tensor& values_in, const at::Tensor& old_in, const at::Tensor& returns_in,
    const at::Tensor& weights_in, const at::Tensor& mask_in, std::optional<double> clip_in) {
  constexpr const char* fn = "value_loss_fwd";
  TORCH_CHECK(values_in.dim() == 1, fn, ": values must be [N], got shape ", values_in.sizes());
  const int64_t N = values_in.size(0);
  const bool has_clip = clip_in.has_value();
  const at::Tensor v_t = vec_f32(fn, "values", values_in, N);
  const at::Tensor old_t = has_clip ? vec_f32(fn, "old_values", old_in, N) : at::Tensor();
  const at::Tensor ret_t = vec_f32(fn, "returns", returns_in, N);
  const bool has_w = !detail::is_empty(weights_in) || N == 0;
  const at::Tensor w_t = has_w ? vec_f32(fn, "weights", weights_in, N) : at::Tensor();
  const at::Tensor m_t = vec_f32(fn, "mask", mask_in, N);
  at::Tensor g_v_t = at::empty({N}, v_t.options());
  ValueArgs p;
  p.v = v_t.data_ptr<float>();
  p.old = has_clip ? old_t.data_ptr<float>() : nullptr;
  p.ret = ret_t.data_ptr<float>();
  p.w = has_w ? w_t.data_ptr<float>() : nullptr;
  p.m = m_t.data_ptr<float>();
  p.g_v = g_v_t.data_ptr<float>();
  p.clip = static_cast<float>(clip_in.value_or(0.0));
  // the mask's value check, and the token-mean divisor max(Σ m, 1) rounded to float32 (as torch's float32 sum is
  // for a 0/1 mask)
  const double total_m = mask_sum(p.m, N, /*check=*/true);
  p.wdiv = has_w ? 1.0f : static_cast<float>(std::max(total_m, 1.0));

  const int64_t C = chunks_of(N);
  std::vector<double> part(C * VNCOL, 0.0);
  const ValueChunkFn chunk = value_chunk_fn(has_clip, has_w);
  parallel_work(0, C, kValueChunkNs, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) chunk(p, c * kChunk, std::min(N, (c + 1) * kChunk), part.data() + c * VNCOL);
  });
  double tot[VNCOL] = {0};
  for (int64_t c = 0; c < C; ++c) {
    const double* row = part.data() + c * VNCOL;
    tot[VLOSS] += row[VLOSS];
    tot[VCLIP] += row[VCLIP];
    merge_moments(tot, row[VCNT], row[SR], row[SV], row[M2R], row[M2E]);
  }
  const double inv = 1.0 / std::max(tot[VCNT], 1.0);
  const double bessel = std::max(tot[VCNT] - 1.0, 1.0);
  const double var_r = tot[M2R] / bessel, var_e = tot[M2E] / bessel;
  const double tiny = std::numeric_limits<float>::min();
  at::Tensor stats = at::empty({4}, v_t.options());
  float* s = stats.data_ptr<float>();
  s[0] = static_cast<float>(tot[VCLIP] * inv);
  s[1] = static_cast<float>(var_r > 0 ? 1.0 - var_e / std::max(var_r, tiny) : 0.0);
  s[2] = static_cast<float>(tot[SV] * inv);
  s[3] = static_cast<float>(tot[SR] * inv);
  return {scalar_f32(tot[VLOSS]), g_v_t, stats};
}

}  // namespace signalrl

// The schema and fake of this op are signalrl/ops/ppo.py (torch.library); this is its CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) { m.impl("value_loss_fwd", &signalrl::value_loss_fwd); }

// family ppo: the per-token PPO epilogue (clipped surrogate + KL + entropy bonus) and the clipped value loss
// (the KL estimators: kl.h for their math, kl.cpp for the kl ops). The math is that of docs/backends.md
// (family ppo) and of the Triton kernels (signalrl/kernels/ppo.py): per-token values in float32 as the reference
// computes them (the ties of max/min split the gradient in halves, clamp passes it on its closed interval;
// approx_kl's ρ − 1 − log ρ is formed in float64), sums in float64. Stats are written in the order of
// signalrl/reference/stat_keys.py (PPO_STAT_KEYS, VALUE_STAT_KEYS).
// The mask selects: every per-token input is read as 0 where mask == 0 (a ternary, never a product with the mask,
// since NaN·0 = NaN), so whatever a masked position holds, results equal those with zeros there.
// Statistics are partial sums over fixed chunks of kChunk tokens, merged in chunk order: the result does not
// depend on the number of threads. Memory: the outputs plus float64 partials, 16 per chunk.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "kl.h"

namespace signalrl {

namespace {

constexpr int64_t kChunk = 4096;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// NaN-propagating max / min / clamp, like torch.maximum / torch.minimum / torch.clamp
inline float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b); }
inline float nan_min(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::min(a, b); }
inline float nan_clamp(float x, float lo, float hi) { return std::isnan(x) ? x : std::min(std::max(x, lo), hi); }
inline double sticky_min(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::min(a, b); }
inline double sticky_max(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::max(a, b); }

using detail::vec_f32;

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && !detail::is_empty(*t); }

int64_t chunks_of(int64_t n) { return std::max<int64_t>(1, (n + kChunk - 1) / kChunk); }

at::Tensor scalar_f32(double x) { return at::full({}, x, at::TensorOptions().dtype(at::kFloat)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_token_fwd(
    const at::Tensor& logprobs_in, const at::Tensor& old_in, const at::Tensor& adv_in,
    const at::Tensor& weights_in, const at::Tensor& mask_in, const std::optional<at::Tensor>& ref_in,
    const std::optional<at::Tensor>& ent_in, double clip_low, double clip_high,
    std::optional<double> dual_clip, c10::string_view kl_estimator, double kl_coef,
    double entropy_coef, std::optional<double> log_ratio_clamp) {
  constexpr const char* fn = "ppo_token_fwd";
  TORCH_CHECK(logprobs_in.dim() == 1, fn, ": logprobs must be [N], got shape ", logprobs_in.sizes());
  const int64_t N = logprobs_in.size(0);
  const at::Tensor lp_t = vec_f32(fn, "logprobs", logprobs_in, N);
  const at::Tensor old_t = vec_f32(fn, "old_logprobs", old_in, N);
  const at::Tensor adv_t = vec_f32(fn, "advantages", adv_in, N);
  const at::Tensor w_t = vec_f32(fn, "weights", weights_in, N);
  const at::Tensor m_t = vec_f32(fn, "mask", mask_in, N);
  const bool has_ref = present(ref_in), has_ent = present(ent_in), has_dual = dual_clip.has_value();
  const at::Tensor ref_t = has_ref ? vec_f32(fn, "ref_logprobs", *ref_in, N) : at::Tensor();
  const at::Tensor ent_t = has_ent ? vec_f32(fn, "entropy", *ent_in, N) : at::Tensor();
  const KlEst est = kl_code(fn, kl_estimator);

  const auto f32 = lp_t.options();
  at::Tensor g_lp_t = at::empty({N}, f32);
  at::Tensor g_ent_t = at::empty({has_ent ? N : 0}, f32);
  const float* lp = lp_t.data_ptr<float>();
  const float* old = old_t.data_ptr<float>();
  const float* adv = adv_t.data_ptr<float>();
  const float* w = w_t.data_ptr<float>();
  const float* m = m_t.data_ptr<float>();
  const float* ref = has_ref ? ref_t.data_ptr<float>() : nullptr;
  const float* ent = has_ent ? ent_t.data_ptr<float>() : nullptr;
  float* g_lp = g_lp_t.data_ptr<float>();
  float* g_ent = has_ent ? g_ent_t.data_ptr<float>() : nullptr;
  // the bounds as the reference rounds them: a Python float applied to a float32 tensor
  const float lo = static_cast<float>(1.0 - clip_low), hi = static_cast<float>(1.0 + clip_high);
  const float dual = static_cast<float>(dual_clip.value_or(0.0));
  const float klc = static_cast<float>(kl_coef), entc = static_cast<float>(entropy_coef);
  const bool has_lr_clamp = log_ratio_clamp.has_value();
  const float lr_c = static_cast<float>(log_ratio_clamp.value_or(0.0));

  enum { LOSS, PG, CNT, CLIP, DUAL, AKL, RATIO, RMIN, RMAX, KL, ENT, NCOL };
  const int64_t C = chunks_of(N);
  std::vector<double> part(C * NCOL, 0.0);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* row = part.data() + c * NCOL;
      row[RMIN] = kInf;
      row[RMAX] = -kInf;
      for (int64_t i = c * kChunk, end = std::min(N, (c + 1) * kChunk); i < end; ++i) {
        const bool sel = m[i] != 0.0f;
        const float lpi = sel ? lp[i] : 0.0f, oldi = sel ? old[i] : 0.0f, a = sel ? adv[i] : 0.0f;
        float log_ratio = lpi - oldi;
        // torch.clamp: the gradient passes on the closed interval only
        const bool lr_free = !has_lr_clamp || (log_ratio >= -lr_c && log_ratio <= lr_c);
        if (has_lr_clamp) log_ratio = nan_clamp(log_ratio, -lr_c, lr_c);
        const float ratio = std::exp(log_ratio);
        const float r = a == 0.0f ? 1.0f : ratio;  // A = 0: ℓ_pg = −0·1 = 0, no gradient, whatever ρ (no 0·inf)
        const float unclipped = -a * r;
        const float clipped = -a * nan_clamp(r, lo, hi);
        const float g_un = unclipped;  // ∂(−A·ρ)/∂lp
        const float g_cl = (r >= lo && r <= hi) ? g_un : 0.0f;
        float pg = nan_max(unclipped, clipped);
        float g = unclipped > clipped ? g_un : (clipped > unclipped ? g_cl : 0.5f * (g_un + g_cl));
        bool dual_flag = false;
        if (has_dual && a < 0) {
          const float bound = -a * dual;
          dual_flag = pg > bound;
          g = pg < bound ? g : (pg > bound ? 0.0f : 0.5f * g);
          pg = nan_min(pg, bound);
        }
        if (!lr_free) g = 0.0f;
        float loss = pg, kl = 0.0f;
        if (has_ref) {  // a zero coefficient drops the term, as the reference does (0·inf would be NaN)
          float g_kl;
          kl_math(lpi - (sel ? ref[i] : 0.0f), est, kl, g_kl);
          if (klc != 0.0f) {
            loss += klc * kl;
            g += klc * g_kl;
          }
        }
        const float enti = has_ent && sel ? ent[i] : 0.0f;
        if (has_ent) {
          if (entc != 0.0f) loss -= entc * enti;
          g_ent[i] = w[i] * -entc;
        }
        g_lp[i] = w[i] * g;
        const double mi = m[i];
        row[LOSS] += static_cast<double>(w[i]) * loss;
        row[PG] += static_cast<double>(w[i]) * pg;
        row[CNT] += mi;
        row[CLIP] += mi * (clipped > unclipped ? 1.0 : 0.0);
        row[DUAL] += mi * (dual_flag ? 1.0 : 0.0);
        row[AKL] += mi * (static_cast<double>(ratio) - 1.0 - log_ratio);
        row[RATIO] += mi * ratio;
        if (m[i] > 0) {
          row[RMIN] = sticky_min(row[RMIN], ratio);
          row[RMAX] = sticky_max(row[RMAX], ratio);
        }
        if (has_ref) row[KL] += mi * kl;
        if (has_ent) row[ENT] += mi * enti;
      }
    }
  });
  double tot[NCOL] = {0};
  tot[RMIN] = kInf;
  tot[RMAX] = -kInf;
  for (int64_t c = 0; c < C; ++c) {
    const double* row = part.data() + c * NCOL;
    for (int k = 0; k < NCOL; ++k) {
      if (k == RMIN) tot[k] = sticky_min(tot[k], row[k]);
      else if (k == RMAX) tot[k] = sticky_max(tot[k], row[k]);
      else tot[k] += row[k];
    }
  }
  const double inv = 1.0 / std::max(tot[CNT], 1.0);
  const bool any = tot[CNT] > 0;
  at::Tensor stats = at::empty({9}, f32);
  float* s = stats.data_ptr<float>();
  s[0] = static_cast<float>(tot[CLIP] * inv);
  s[1] = static_cast<float>(tot[DUAL] * inv);
  s[2] = static_cast<float>(tot[AKL] * inv);
  s[3] = static_cast<float>(tot[RATIO] * inv);
  s[4] = static_cast<float>(any ? tot[RMIN] : 0.0);
  s[5] = static_cast<float>(any ? tot[RMAX] : 0.0);
  s[6] = static_cast<float>(tot[PG]);
  s[7] = static_cast<float>(tot[ENT] * inv);
  s[8] = static_cast<float>(tot[KL] * inv);
  return {scalar_f32(tot[LOSS]), g_lp_t, g_ent_t, stats};
}

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
  const at::Tensor w_t = vec_f32(fn, "weights", weights_in, N);
  const at::Tensor m_t = vec_f32(fn, "mask", mask_in, N);
  const float* v = v_t.data_ptr<float>();
  const float* old = has_clip ? old_t.data_ptr<float>() : nullptr;
  const float* ret = ret_t.data_ptr<float>();
  const float* w = w_t.data_ptr<float>();
  const float* m = m_t.data_ptr<float>();
  at::Tensor g_v_t = at::empty({N}, v_t.options());
  float* g_v = g_v_t.data_ptr<float>();
  const float clip = static_cast<float>(clip_in.value_or(0.0));

  // pass 1: loss, gradient, counts and first moments; pass 2: second moments about the means (two-pass
  // variances in float64, the reference's masked_var)
  enum { LOSS, CNT, CLIP, SV, SR, SE, NCOL };
  const int64_t C = chunks_of(N);
  std::vector<double> part(C * NCOL, 0.0);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* row = part.data() + c * NCOL;
      for (int64_t i = c * kChunk, end = std::min(N, (c + 1) * kChunk); i < end; ++i) {
        const bool sel = m[i] != 0.0f;
        const float vi = sel ? v[i] : 0.0f, ri = sel ? ret[i] : 0.0f;
        const float diff = vi - ri;
        const float err = diff * diff;
        float loss, g;
        bool flag = false;
        if (has_clip) {
          const float oi = sel ? old[i] : 0.0f;
          const float dv = vi - oi;
          const float dc = (oi + nan_clamp(dv, -clip, clip)) - ri;
          const float err_c = dc * dc;
          const float g_c = (dv >= -clip && dv <= clip) ? dc : 0.0f;
          loss = 0.5f * nan_max(err, err_c);
          g = err > err_c ? diff : (err_c > err ? g_c : 0.5f * (diff + g_c));
          flag = err_c > err && (dv < -clip || dv > clip);
        } else {
          loss = 0.5f * err;
          g = diff;
        }
        g_v[i] = w[i] * g;
        const double mi = m[i];
        row[LOSS] += static_cast<double>(w[i]) * loss;
        row[CNT] += mi;
        row[CLIP] += mi * (flag ? 1.0 : 0.0);
        row[SV] += mi * vi;
        row[SR] += mi * ri;
        row[SE] += mi * (ri - vi);
      }
    }
  });
  double tot[NCOL] = {0};
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < NCOL; ++k) tot[k] += part[c * NCOL + k];
  const double inv = 1.0 / std::max(tot[CNT], 1.0);
  const double mean_r = tot[SR] * inv, mean_e = tot[SE] * inv;
  std::vector<double> sq(C * 2, 0.0);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double ssr = 0.0, sse = 0.0;
      for (int64_t i = c * kChunk, end = std::min(N, (c + 1) * kChunk); i < end; ++i) {
        const bool sel = m[i] != 0.0f;
        const float vi = sel ? v[i] : 0.0f, ri = sel ? ret[i] : 0.0f;
        const double dr = ri - mean_r, de = static_cast<double>(ri - vi) - mean_e;
        ssr += m[i] * dr * dr;
        sse += m[i] * de * de;
      }
      sq[2 * c] = ssr;
      sq[2 * c + 1] = sse;
    }
  });
  double ssr = 0.0, sse = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    ssr += sq[2 * c];
    sse += sq[2 * c + 1];
  }
  const double bessel = std::max(tot[CNT] - 1.0, 1.0);
  const double var_r = ssr / bessel, var_e = sse / bessel;
  const double tiny = std::numeric_limits<float>::min();
  at::Tensor stats = at::empty({4}, v_t.options());
  float* s = stats.data_ptr<float>();
  s[0] = static_cast<float>(tot[CLIP] * inv);
  s[1] = static_cast<float>(var_r > 0 ? 1.0 - var_e / std::max(var_r, tiny) : 0.0);
  s[2] = static_cast<float>(tot[SV] * inv);
  s[3] = static_cast<float>(mean_r);
  return {scalar_f32(tot[LOSS]), g_v_t, stats};
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/ppo.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("ppo_token_fwd", &signalrl::ppo_token_fwd);
  m.impl("value_loss_fwd", &signalrl::value_loss_fwd);
}

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
// Vectorized (simd.h): W tokens at a time with compares and selects only (no branches) and the native exp; every
// statistic is added into W float64 lanes, summed in lane order at the end of the chunk. The number of threads
// follows the amount of work (parallel.h).
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
#include "parallel.h"
#include "epilogue.h"
#include "simd.h"

namespace signalrl {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// single-thread cost of one chunk of kChunk tokens (ns; 2-core AMD EPYC, vectorized loops)
constexpr double kPpoChunkNs = 4096 * 4.5;
constexpr double kMaskChunkNs = 4096 * 0.1;
constexpr double kScaleTokenNs = 0.1;

inline double sticky_min(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::min(a, b); }
inline double sticky_max(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::max(a, b); }

using detail::vec_f32;
using namespace epilogue;
using simd::vd;
using simd::vf;
using simd::vi;
using simd::W;

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && !detail::is_empty(*t); }

// ---- ppo_token_fwd ----------------------------------------------------------------------------

enum PpoCol { LOSS, PG, CNT, CLIP, DUAL, AKL, RATIO, RMIN, RMAX, KL, ENT, NCOL };

struct PpoArgs {
  const float *lp, *old, *adv, *w, *m, *ref, *ent;
  float *g_lp, *g_ent;
  float lo, hi, dual, klc, entc, lr_c;
  float wdiv;  // w == nullptr: token-mean weights m / wdiv (see mask_sum)
  bool has_dual, has_lr;
};

// tokens [b, e) (one chunk): per-token gradients into g_lp / g_ent, the chunk's statistics into row[NCOL]
template <bool HAS_REF, KlEst E, bool HAS_ENT>
SIGNAL_MULTIVERSION void ppo_chunk(const PpoArgs& p, int64_t b, int64_t e, double* row) {
  using namespace simd;
  vd acc[NCOL];
  for (int k = 0; k < NCOL; ++k) acc[k] = vd{};
  vf rmin = splat(std::numeric_limits<float>::infinity()), rmax = -rmin;
  const vf zero = vf{}, one = splat(1.0f), half = splat(0.5f);
  const vf lo = splat(p.lo), hi = splat(p.hi), dual = splat(p.dual), lr_hi = splat(p.lr_c), lr_lo = -lr_hi;
  const float klc = p.klc, entc = p.entc;
  const bool has_dual = p.has_dual, has_lr = p.has_lr;
  const float* const in[7] = {p.m, p.w, p.lp, p.old, p.adv, HAS_REF ? p.ref : nullptr, HAS_ENT ? p.ent : nullptr};
  float* const out[2] = {p.g_lp, HAS_ENT ? p.g_ent : nullptr};
  const vf wdiv = splat(p.wdiv);
  for_vectors<7, 2>(b, e, in, out, [&](const float* const* x, float* const* y, int64_t i) __attribute__((always_inline)) {
    const vf mi = load(x[0] + i);
    const vf wi = x[1] != nullptr ? load(x[1] + i) : mi / wdiv;  // token-mean weights: as token_weights divides
    // the mask selects: every input is loaded, then read as 0 where mask == 0
    const vi sel = mi != zero;
    const vf lpi = select(sel, load(x[2] + i), zero), oldi = select(sel, load(x[3] + i), zero);
    const vf a = select(sel, load(x[4] + i), zero);
    vf log_ratio = lpi - oldi;
    // torch.clamp: the gradient passes on the closed interval only
    vi lr_free = sel | ~sel;
    if (has_lr) {
      lr_free = (log_ratio >= lr_lo) & (log_ratio <= lr_hi);
      log_ratio = nan_clamp(log_ratio, lr_lo, lr_hi);
    }
    const vf ratio = vexp_v(log_ratio);
    const vf r = select(a == zero, one, ratio);  // A = 0: ℓ_pg = −0·1 = 0, no gradient, whatever ρ (no 0·inf)
    const vf unclipped = -a * r;
    const vf clipped = -a * nan_clamp(r, lo, hi);
    const vf g_un = unclipped;  // ∂(−A·ρ)/∂lp
    const vf g_cl = select((r >= lo) & (r <= hi), g_un, zero);
    vf pg = nan_max(unclipped, clipped);
    vf g = select(unclipped > clipped, g_un, select(clipped > unclipped, g_cl, half * (g_un + g_cl)));
    vi dual_flag = sel & ~sel;
    if (has_dual) {
      const vi on = a < zero;
      const vf bound = -a * dual;
      dual_flag = on & (pg > bound);
      const vf g_dual = select(pg < bound, g, select(pg > bound, zero, half * g));
      g = select(on, g_dual, g);
      pg = select(on, nan_min(pg, bound), pg);
    }
    g = select(lr_free, g, zero);
    vf loss = pg, kl = zero;
    if constexpr (HAS_REF) {  // a zero coefficient drops the term, as the reference does (0·inf would be NaN)
      vf g_kl;
      kl_math_v<E>(lpi - select(sel, load(x[5] + i), zero), kl, g_kl);
      if (klc != 0.0f) {
        loss = loss + klc * kl;
        g = g + klc * g_kl;
      }
    }
    vf enti = zero;
    if constexpr (HAS_ENT) {
      enti = select(sel, load(x[6] + i), zero);
      if (entc != 0.0f) loss = loss - entc * enti;
      store(y[1] + i, wi * -entc);
    }
    store(y[0] + i, wi * g);
    const vd md = to_d(mi), wd = to_d(wi);
    acc[LOSS] += wd * to_d(loss);
    acc[PG] += wd * to_d(pg);
    acc[CNT] += md;
    acc[CLIP] += md * to_d(one_if(clipped > unclipped));
    acc[DUAL] += md * to_d(one_if(dual_flag));
    acc[AKL] += md * ((to_d(ratio) - 1.0) - to_d(log_ratio));
    acc[RATIO] += md * to_d(ratio);
    const vi counted = mi > zero;
    rmin = select(counted, nan_min(rmin, ratio), rmin);
    rmax = select(counted, nan_max(rmax, ratio), rmax);
    if constexpr (HAS_REF) acc[KL] += md * to_d(kl);
    if constexpr (HAS_ENT) acc[ENT] += md * to_d(enti);
  });
  for (int k = 0; k < NCOL; ++k) row[k] = lanes_total(acc[k]);
  row[RMIN] = kInf;
  row[RMAX] = -kInf;
  for (int l = 0; l < W; ++l) {
    row[RMIN] = sticky_min(row[RMIN], rmin[l]);
    row[RMAX] = sticky_max(row[RMAX], rmax[l]);
  }
}

using PpoChunkFn = void (*)(const PpoArgs&, int64_t, int64_t, double*);

template <bool HAS_ENT>
PpoChunkFn ppo_chunk_fn(bool has_ref, KlEst est) {
  if (!has_ref) return &ppo_chunk<false, KlEst::k1, HAS_ENT>;
  PpoChunkFn f = nullptr;
  with_estimator(est, [&](auto k) { f = &ppo_chunk<true, decltype(k)::value, HAS_ENT>; });
  return f;
}

// Over the mask's chunks: whether a value is negative, NaN or ±inf (signalrl.ops._validate.mask_values), and Σ m.
SIGNAL_MULTIVERSION void mask_chunk_scan(const float* m, int64_t b, int64_t e, double* sum, bool* bad) {
  using namespace simd;
  const vf zero = vf{}, top = splat(std::numeric_limits<float>::max());
  vd acc = vd{};
  vi flag = vi{};
  const float* const in[1] = {m};
  float* const no_out[1] = {nullptr};
  for_sub_blocks(b, e, [&](int64_t sb, int64_t se) __attribute__((always_inline)) {
    vf s = zero;
    for_vectors<1, 1>(sb, se, in, no_out, [&](const float* const* x, float* const*, int64_t i)
                                              __attribute__((always_inline)) {
      const vf v = load(x[0] + i);
      flag |= ~((v >= zero) & (v <= top));  // NaN compares false: bad
      s += v;
    });
    acc += to_d(s);
  });
  *sum = lanes_total(acc);
  int any = 0;
  for (int l = 0; l < W; ++l) any |= flag[l] != 0;
  *bad = any != 0;
}

// The CPU mask check of signalrl.ops._validate.mask_values as one pass: true if a value is negative, NaN or ±inf
// (floating masks, compared in their own dtype) or negative (integer masks). The op layer then finds the first bad
// value and raises its ValueError; a clean mask costs this pass only.
bool mask_bad_f32(const float* x, int64_t n) {
  for (int64_t b = 0; b < n; b += kChunk) {
    double sum = 0.0;
    bool bad = false;
    mask_chunk_scan(x, b, std::min(n, b + kChunk), &sum, &bad);
    if (bad) return true;
  }
  return false;
}

template <class T>
bool mask_bad_values(const T* x, int64_t n) {
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    int bad = 0;
    if constexpr (std::is_integral_v<T>) {
      for (int64_t i = b; i < e; ++i) bad |= x[i] < 0;
    } else if constexpr (std::is_floating_point_v<T>) {
      const T top = std::numeric_limits<T>::max();
      for (int64_t i = b; i < e; ++i) bad |= !(x[i] >= T(0) && x[i] <= top);  // NaN compares false: bad
    } else {  // Half, BFloat16: their float value
      for (int64_t i = b; i < e; ++i) {
        const float v = static_cast<float>(x[i]);
        bad |= !(v >= 0.0f && v <= std::numeric_limits<float>::max());
      }
    }
    if (bad) return true;
  }
  return false;
}

}  // namespace

// (epilogue.h)
double mask_sum(const float* m, int64_t N, bool check) {
  const int64_t C = chunks_of(N);
  std::vector<double> part(C, 0.0);
  std::vector<char> bad(C, 0);
  parallel_work(0, C, kMaskChunkNs, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      bool b = false;
      mask_chunk_scan(m, c * kChunk, std::min(N, (c + 1) * kChunk), &part[c], &b);
      bad[c] = b;
    }
  });
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(!check || !bad[c], "mask: expected finite values ≥ 0 (0 = not counted, > 0 = counted with that weight)");
    total += part[c];
  }
  return total;
}


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
  // empty weights: the token-mean weights of the mask, computed here
  const bool has_w = !detail::is_empty(weights_in) || N == 0;
  const at::Tensor w_t = has_w ? vec_f32(fn, "weights", weights_in, N) : at::Tensor();
  const at::Tensor m_t = vec_f32(fn, "mask", mask_in, N);
  const bool has_ref = present(ref_in), has_ent = present(ent_in);
  const at::Tensor ref_t = has_ref ? vec_f32(fn, "ref_logprobs", *ref_in, N) : at::Tensor();
  const at::Tensor ent_t = has_ent ? vec_f32(fn, "entropy", *ent_in, N) : at::Tensor();
  const KlEst est = kl_code(fn, kl_estimator);

  const auto f32 = lp_t.options();
  at::Tensor g_lp_t = at::empty({N}, f32);
  at::Tensor g_ent_t = at::empty({has_ent ? N : 0}, f32);
  PpoArgs p;
  p.lp = lp_t.data_ptr<float>();
  p.old = old_t.data_ptr<float>();
  p.adv = adv_t.data_ptr<float>();
  p.w = has_w ? w_t.data_ptr<float>() : nullptr;
  p.m = m_t.data_ptr<float>();
  // the token-mean divisor max(Σ m, 1) rounded to float32, as torch's float32 sum is for a 0/1 mask (the mask's
  // values are checked by the op layer)
  p.wdiv = has_w ? 1.0f : static_cast<float>(std::max(mask_sum(p.m, N, /*check=*/false), 1.0));
  p.ref = has_ref ? ref_t.data_ptr<float>() : nullptr;
  p.ent = has_ent ? ent_t.data_ptr<float>() : nullptr;
  p.g_lp = g_lp_t.data_ptr<float>();
  p.g_ent = has_ent ? g_ent_t.data_ptr<float>() : nullptr;
  // the bounds as the reference rounds them: a Python float applied to a float32 tensor
  p.lo = static_cast<float>(1.0 - clip_low);
  p.hi = static_cast<float>(1.0 + clip_high);
  p.has_dual = dual_clip.has_value();
  p.dual = static_cast<float>(dual_clip.value_or(0.0));
  p.klc = static_cast<float>(kl_coef);
  p.entc = static_cast<float>(entropy_coef);
  p.has_lr = log_ratio_clamp.has_value();
  p.lr_c = static_cast<float>(log_ratio_clamp.value_or(0.0));
  const PpoChunkFn chunk = has_ent ? ppo_chunk_fn<true>(has_ref, est) : ppo_chunk_fn<false>(has_ref, est);

  const int64_t C = chunks_of(N);
  std::vector<double> part(C * NCOL, 0.0);
  parallel_work(0, C, kPpoChunkNs, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) chunk(p, c * kChunk, std::min(N, (c + 1) * kChunk), part.data() + c * NCOL);
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

static SIGNAL_MULTIVERSION void scale_loop(const float* __restrict__ g, float s, float* __restrict__ o, int64_t b,
                                    int64_t e) {
  for (int64_t i = b; i < e; ++i) o[i] = g[i] * s;
}

// The backward of ppo_token_fwd / value_loss_fwd: the forward's weighted per-token gradient times the incoming
// scalar gradient (read on the host: CPU), float32 as torch's g * g_loss, on threads by the amount of work (an ATen
// multiply of a few 10^4 floats would split across every thread, parallel.h).
at::Tensor ppo_grad_scale(const at::Tensor& grad, const at::Tensor& grad_loss) {
  constexpr const char* fn = "ppo_grad_scale";
  TORCH_CHECK(grad.dim() == 1, fn, ": grad must be [N], got shape ", grad.sizes());
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device().is_cpu(), fn, ": grad_loss must be one CPU value");
  const int64_t N = grad.size(0);
  const at::Tensor g_t = vec_f32(fn, "grad", grad, N);
  const float s = grad_loss.to(at::kFloat).item<float>();
  at::Tensor out = at::empty({N}, g_t.options());
  const float* g = g_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  parallel_work(0, N, kScaleTokenNs, [&](int64_t b, int64_t e) { scale_loop(g, s, o, b, e); });
  return out;
}

at::Tensor mask_check(const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.device().is_cpu(), "mask_check: mask must be a CPU tensor");
  const at::Tensor m = mask_in.contiguous();
  const int64_t n = m.numel();
  bool bad = false;
  switch (m.scalar_type()) {
    case at::kFloat: bad = mask_bad_f32(m.data_ptr<float>(), n); break;
    case at::kDouble: bad = mask_bad_values(m.data_ptr<double>(), n); break;
    case at::kHalf: bad = mask_bad_values(m.data_ptr<at::Half>(), n); break;
    case at::kBFloat16: bad = mask_bad_values(m.data_ptr<at::BFloat16>(), n); break;
    case at::kLong: bad = mask_bad_values(m.data_ptr<int64_t>(), n); break;
    case at::kInt: bad = mask_bad_values(m.data_ptr<int32_t>(), n); break;
    default: break;  // bool, uint8: never negative
  }
  return at::scalar_tensor(bad, at::TensorOptions().dtype(at::kBool));
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/ppo.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("ppo_token_fwd", &signalrl::ppo_token_fwd);
  m.impl("ppo_grad_scale", &signalrl::ppo_grad_scale);
  m.impl("mask_check", &signalrl::mask_check);  // schema: signalrl/ops/_validate.py
}

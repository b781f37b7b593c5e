// family gae: generalized advantage estimation over [B, T] rows with exact mask semantics.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "common.h"
#include "kernels.h"
#include "parallel.h"

namespace signalrl {

namespace {

// Steps t = t_end-1 .. 0 of G rows at once (row k at offset k*T), carrying per row the value of
// the next valid position (nv) and its advantage (na). Each row is an independent dependency
// chain, so G rows in flight hide the latency of the recurrence. Masked positions are handled
// with selects (no branches): they output 0 and leave nv/na untouched, which is exactly "drop
// the masked positions, run GAE, scatter back".
template <int G>
inline __attribute__((always_inline)) void gae_steps(const float* r, const float* v,
                                                     const float* m, float* adv, float* ret,
                                                     int64_t T, int64_t t_end, float gamma,
                                                     float gl, float* nv, float* na) {
  for (int64_t t = t_end - 1; t >= 0; --t) {
    for (int k = 0; k < G; ++k) {
      const int64_t o = k * T + t;
      const bool valid = m[o] != 0.0f;
      const float vv = v[o];
      const float a = (r[o] + gamma * nv[k] - vv) + gl * na[k];
      adv[o] = valid ? a : 0.0f;
      ret[o] = valid ? a + vv : 0.0f;
      nv[k] = valid ? vv : nv[k];
      na[k] = valid ? a : na[k];
    }
  }
}

// G whole rows: V(after the last valid token) = last[k], A(after it) = 0.
template <int G>
inline __attribute__((always_inline)) void gae_group(const float* r, const float* v,
                                                     const float* m, const float* last,
                                                     float* adv, float* ret, int64_t T,
                                                     float gamma, float gl) {
  float nv[G], na[G];
  for (int k = 0; k < G; ++k) {
    nv[k] = last[k];
    na[k] = 0.0f;
  }
  gae_steps<G>(r, v, m, adv, ret, T, T, gamma, gl, nv, na);
}

// Scalar path: rows [b0, b1) in groups of 8.
SIGNAL_MULTIVERSION void gae_rows_scalar(const float* r, const float* v, const float* m,
                                         const float* last, float* adv, float* ret, int64_t b0,
                                         int64_t b1, int64_t T, float gamma, float gl) {
  constexpr int G = 8;
  int64_t b = b0;
  for (; b + G <= b1; b += G) {
    gae_group<G>(r + b * T, v + b * T, m + b * T, last + b, adv + b * T, ret + b * T, T, gamma,
                 gl);
  }
  for (; b < b1; ++b) {
    gae_group<1>(r + b * T, v + b * T, m + b * T, last + b, adv + b * T, ret + b * T, T, gamma,
                 gl);
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(SIGNAL_NO_MULTIVERSION)
#define SIGNAL_GAE_SIMD 1

// SIMD across rows: lane k of a vector carries row b + k. A [W rows × W steps] tile of each
// input is read with W contiguous row loads and transposed in registers (log2 W rounds of
// two-input shuffles), so the recurrence runs on whole vectors, one time step per iteration,
// with the exact per-element arithmetic of the scalar loop; the outputs are transposed back
// and stored as contiguous row segments. No gathers, no strided access, no branches.
template <int W>
struct Simd {
  typedef float vf __attribute__((vector_size(4 * W)));
  typedef int vi __attribute__((vector_size(4 * W)));
};

// Round K of the transpose swaps bit K of the row index with bit K of the column index:
// rows i (bit K clear) and i + 2^K exchange the columns whose bit K differs from theirs.
template <int W, int K, bool Upper, std::size_t... J>
constexpr typename Simd<W>::vi swap_mask(std::index_sequence<J...>) {
  return typename Simd<W>::vi{static_cast<int>(
      Upper ? (((J >> K) & 1) ? W + J : (J ^ (1u << K)))
            : (((J >> K) & 1) ? W + (J ^ (1u << K)) : J))...};
}

template <int W, int K>
inline __attribute__((always_inline)) void transpose_round(typename Simd<W>::vf* x) {
  constexpr auto lo = swap_mask<W, K, false>(std::make_index_sequence<W>{});
  constexpr auto hi = swap_mask<W, K, true>(std::make_index_sequence<W>{});
  for (int i = 0; i < W; ++i) {
    if (i & (1 << K)) continue;
    const auto a = x[i], b = x[i + (1 << K)];
    x[i] = __builtin_shuffle(a, b, lo);
    x[i + (1 << K)] = __builtin_shuffle(a, b, hi);
  }
}

template <int W>
inline __attribute__((always_inline)) void transpose(typename Simd<W>::vf* x) {
  transpose_round<W, 0>(x);
  transpose_round<W, 1>(x);
  transpose_round<W, 2>(x);
  if constexpr (W >= 16) transpose_round<W, 3>(x);
}

template <int W>
inline __attribute__((always_inline)) void gae_tile_rows(const float* r, const float* v,
                                                         const float* m, const float* last,
                                                         float* adv, float* ret, int64_t T,
                                                         float gamma, float gl) {
  using vf = typename Simd<W>::vf;
  const vf zero = vf{};
  vf nv, na = zero;
  std::memcpy(&nv, last, sizeof(vf));
  vf R[W], Vv[W], M[W], A[W], Rt[W];
  int64_t t0 = T - W;
  for (; t0 >= 0; t0 -= W) {
    for (int k = 0; k < W; ++k) {
      std::memcpy(&R[k], r + k * T + t0, sizeof(vf));
      std::memcpy(&Vv[k], v + k * T + t0, sizeof(vf));
      std::memcpy(&M[k], m + k * T + t0, sizeof(vf));
    }
    transpose<W>(R);
    transpose<W>(Vv);
    transpose<W>(M);
    for (int j = W - 1; j >= 0; --j) {
      const auto valid = M[j] != zero;
      const vf a = (R[j] + gamma * nv - Vv[j]) + gl * na;
      A[j] = valid ? a : zero;
      Rt[j] = valid ? a + Vv[j] : zero;
      nv = valid ? Vv[j] : nv;
      na = valid ? a : na;
    }
    transpose<W>(A);
    transpose<W>(Rt);
    for (int k = 0; k < W; ++k) {
      std::memcpy(adv + k * T + t0, &A[k], sizeof(vf));
      std::memcpy(ret + k * T + t0, &Rt[k], sizeof(vf));
    }
  }
  // the first T mod W steps: the scalar recurrence, continuing from the lane state
  if (t0 + W > 0) {
    float nvs[W], nas[W];
    std::memcpy(nvs, &nv, sizeof(vf));
    std::memcpy(nas, &na, sizeof(vf));
    gae_steps<W>(r, v, m, adv, ret, T, t0 + W, gamma, gl, nvs, nas);
  }
}

template <int W>
inline __attribute__((always_inline)) void gae_rows_simd(const float* r, const float* v,
                                                         const float* m, const float* last,
                                                         float* adv, float* ret, int64_t b0,
                                                         int64_t b1, int64_t T, float gamma,
                                                         float gl) {
  int64_t b = b0;
  if (T >= W) {
    for (; b + W <= b1; b += W) {
      gae_tile_rows<W>(r + b * T, v + b * T, m + b * T, last + b, adv + b * T, ret + b * T, T,
                       gamma, gl);
    }
  }
  for (; b < b1; ++b) {
    gae_group<1>(r + b * T, v + b * T, m + b * T, last + b, adv + b * T, ret + b * T, T, gamma,
                 gl);
  }
}

__attribute__((target("arch=x86-64-v4"))) void gae_rows_w16(
    const float* r, const float* v, const float* m, const float* last, float* adv, float* ret,
    int64_t b0, int64_t b1, int64_t T, float gamma, float gl) {
  gae_rows_simd<16>(r, v, m, last, adv, ret, b0, b1, T, gamma, gl);
}

__attribute__((target("arch=x86-64-v3"))) void gae_rows_w8(
    const float* r, const float* v, const float* m, const float* last, float* adv, float* ret,
    int64_t b0, int64_t b1, int64_t T, float gamma, float gl) {
  gae_rows_simd<8>(r, v, m, last, adv, ret, b0, b1, T, gamma, gl);
}

// rows per SIMD tile on this CPU (1: no SIMD path)
int simd_width() {
  static const int w = __builtin_cpu_supports("avx512f") ? 16
                       : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 8
                                                                                           : 1;
  return w;
}
#else
int simd_width() { return 1; }
#endif

void gae_rows(const float* r, const float* v, const float* m, const float* last, float* adv,
              float* ret, int64_t b0, int64_t b1, int64_t T, float gamma, float gl) {
#ifdef SIGNAL_GAE_SIMD
  if (simd_width() == 16) return gae_rows_w16(r, v, m, last, adv, ret, b0, b1, T, gamma, gl);
  if (simd_width() == 8) return gae_rows_w8(r, v, m, last, adv, ret, b0, b1, T, gamma, gl);
#endif
  gae_rows_scalar(r, v, m, last, adv, ret, b0, b1, T, gamma, gl);
}

void check_bt(const char* name, const at::Tensor& t, int64_t B, int64_t T) {
  TORCH_CHECK(t.device().is_cpu(), "gae_fwd: expected CPU tensors, got ", name, " on ",
              t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, "gae_fwd: ", name, " must be [",
              B, ", ", T, "], got shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards_in,
                                           const at::Tensor& values_in,
                                           const at::Tensor& mask_in,
                                           const at::Tensor& last_values_in, double gamma,
                                           double lam) {
  TORCH_CHECK(rewards_in.dim() == 2, "gae_fwd: rewards must be [B, T], got shape ",
              rewards_in.sizes());
  const int64_t B = rewards_in.size(0), T = rewards_in.size(1);
  check_bt("rewards", rewards_in, B, T);
  check_bt("values", values_in, B, T);
  check_bt("mask", mask_in, B, T);
  TORCH_CHECK(last_values_in.dim() == 1 && last_values_in.size(0) == B,
              "gae_fwd: last_values must be [", B, "], got shape ", last_values_in.sizes());
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor r = f32(rewards_in), v = f32(values_in), m = f32(mask_in);
  const at::Tensor last = f32(last_values_in);
  at::Tensor adv = at::empty({B, T}, r.options());
  at::Tensor ret = at::empty({B, T}, r.options());
  if (B == 0 || T == 0) return {adv, ret};
  const float g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
  const float* rp = r.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* lp = last.data_ptr<float>();
  float* ap = adv.data_ptr<float>();
  float* tp = ret.data_ptr<float>();
  // parallel over tiles of `w` rows, so that every task but the last holds whole tiles
  const int64_t w = std::max(simd_width(), 8);
  const int64_t tiles = (B + w - 1) / w;
  // single-thread cost ~2 ns per element (2-core AMD EPYC): B=256, T=1024 (0.5 ms) runs on one thread
  parallel_work(0, tiles, 2.0 * static_cast<double>(w * T), [&](int64_t i0, int64_t i1) {
    gae_rows(rp, vp, mp, lp, ap, tp, i0 * w, std::min(B, i1 * w), T, g, gl);
  });
  return {adv, ret};
}

}  // namespace signalrl

// The schemas and fakes of these ops are signalrl/ops/gae.py (torch.library); this is their CPU kernel.
TORCH_LIBRARY_IMPL(signalrl, CPU, m) {
  m.impl("gae_fwd", &signalrl::gae_fwd);
}

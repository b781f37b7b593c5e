// The blocks both linear log-prob plans are made of (linear_logprobs.cpp, linear_logprobs_frozen.cpp): the checked and
// flattened arguments, float32 row / vocabulary blocks of hidden and weight, one logits block by GEMM into a scratch
// buffer, and the block sizes of the group plan. See the top of linear_logprobs.cpp for the plans.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace signalrl {
namespace linear {

constexpr int64_t kRows = 1024;
constexpr int64_t kVocab = 1024;
constexpr int64_t kGroups = 16;             // fixed vocab groups of the group plan (not the number of threads)
constexpr int64_t kTileFloats = 64 * 1024;  // a group's logits block: rows × Vb ≈ 256 KiB
constexpr int64_t kGroupBudget = 256 * 1024;  // floats of all per-group d(hidden) partials (1 MiB)
constexpr double kGemmNsPerFlop = 1.0 / 80.0;     // single-thread float32 GEMM ≈ 80 GFLOP/s (2-core AMD EPYC)

// vocab block of the group plan for nr rows: a multiple of 64 in [64, 1024]
inline int64_t group_block(int64_t nr) {
  return std::min<int64_t>(1024, std::max<int64_t>(64, kTileFloats / std::max<int64_t>(nr, 1) / 64 * 64));
}

struct LinearArgs {
  at::Tensor hidden, weight, bias_f32, valid_rows;  // valid_rows: int64 [Nv] row indices
  const int64_t* targets = nullptr;
  int64_t N = 0, H = 0, V = 0, Nv = 0;
  float scale = 1.0f;
};

inline LinearArgs prepare(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
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
inline at::Tensor hidden_block(const LinearArgs& a, int64_t r0, int64_t nr) {
  if (a.Nv == a.N) return a.hidden.narrow(0, r0, nr).to(at::kFloat).contiguous();
  return a.hidden.index_select(0, a.valid_rows.narrow(0, r0, nr)).to(at::kFloat);
}

inline at::Tensor weight_block(const LinearArgs& a, int64_t v0, int64_t nv) {
  return a.weight.narrow(0, v0, nv).to(at::kFloat).contiguous();
}

// z[nr, nv] = h_blk @ w_blk.T (+ bias[v0 : v0+nv]), float32, written into z (any row stride)
inline void logits_into(const LinearArgs& a, at::Tensor& z, const at::Tensor& h_blk, const at::Tensor& w_blk,
                        int64_t v0) {
  if (a.bias_f32.defined()) {
    at::addmm_out(z, a.bias_f32.narrow(0, v0, w_blk.size(0)), h_blk, w_blk.t());
  } else {
    at::mm_out(z, h_blk, w_blk.t());
  }
}

// z[nr, nv] as above, written into the scratch buffer
inline at::Tensor logits_block(const LinearArgs& a, at::Tensor& scratch, const at::Tensor& h_blk,
                        const at::Tensor& w_blk, int64_t v0) {
  const int64_t nr = h_blk.size(0), nv = w_blk.size(0);
  at::Tensor z = scratch.narrow(0, 0, nr * nv).view({nr, nv});
  logits_into(a, z, h_blk, w_blk, v0);
  return z;
}

// The kept-logits plan (see the top of linear_logprobs.cpp): kept is float32 [N, K], row k holding the first K raw
// logits (h·Wᵀ + b) of the k-th kept row; undefined or K = 0 when nothing is kept.
inline bool block_is_kept(const at::Tensor& kept, int64_t v0, int64_t nv) {
  return kept.defined() && v0 + nv <= kept.size(1);
}

// The forward's logits of kept rows [r0, r0+nr) and vocab [v0, v0+nv): computed straight into kept when the block
// lies within its columns, else into scratch, the part within them then copied into kept. Row stride: z.stride(0).
inline at::Tensor forward_block(const LinearArgs& a, at::Tensor& scratch, const at::Tensor& kept,
                                const at::Tensor& h_blk, const at::Tensor& w_blk, int64_t r0, int64_t v0) {
  const int64_t nr = h_blk.size(0), nv = w_blk.size(0);
  if (block_is_kept(kept, v0, nv)) {
    at::Tensor z = kept.narrow(0, r0, nr).narrow(1, v0, nv);
    logits_into(a, z, h_blk, w_blk, v0);
    return z;
  }
  at::Tensor z = logits_block(a, scratch, h_blk, w_blk, v0);
  const int64_t part = kept.defined() ? std::min(nv, kept.size(1) - v0) : 0;
  if (part > 0) kept.narrow(0, r0, nr).narrow(1, v0, part).copy_(z.narrow(1, 0, part));
  return z;
}

inline at::Tensor empty_f32(const at::Tensor& like) {
  return at::empty({0}, like.options().dtype(at::kFloat));
}

}  // namespace linear
}  // namespace signalrl

"""Triton kernels: the backward of per-token log-probs from hidden states and the LM head (family
``linear_logprobs``, forward in :mod:`.linear_logprobs`), without [N, V] logits.

Backward (``linear_token_logprobs_bwd``): the logits are recomputed tile by tile in chunks of Vc vocabulary
columns; per chunk, one kernel applies the gradient formula in float32 ((delta - p) is formed in float32 before the
single downcast, so the true-class gradient has no bf16 cancellation) and writes the chunk's g_z/T as G (weight
dtype) plus per-row-block column sums for d bias; then cuBLAS/Triton GEMMs consume G. The order depends on what is
trained (``backward_plan``):

- vocab-major (the LM head is trained): each chunk holds all N rows, so d W[chunk] = G^T @ hidden is one complete
  GEMM over N (cuBLAS through torch.mm, float32 accumulation inside, written straight into the output rows:
  deterministic, one rounding) and d hidden += G @ W[chunk] accumulates in a float32 [N, H] buffer (the output
  itself for float32 hidden): cuBLAS with a float32 output (torch.addmm(out_dtype=float32), in place) where this
  torch has it, else a Triton GEMM (``_DH_GEMM``).
- row-major (a frozen head, as under LoRA): the rows are cut into chunks of R rows; each row chunk walks every vocab
  chunk, so its d hidden is complete (float32 accumulator of R rows, cast into the output) and nothing spans chunks.
  R is the largest multiple of 128 keeping the extra memory within 1 % of the [N, V] float32 logits (bias terms
  included), at least 1024, then evened out over the chunks (a multiple of 128 again, never larger).

Extra memory (beyond inputs, outputs and a few [N] float32 vectors) — the exact bound, ``backward_plan(...)``:
    forward:  12·N·SPLIT + 4·N bytes  (SPLIT ≤ ceil(V / 256), about 8 × SM count / (N / 128); a few MiB)
    backward: R·Vc·e  (one gradient chunk; e = element size of weight; Vc = min(V, max(1024, H / 2)) rounded up
              to a multiple of 128; R = N in the vocab-major order)
            + 4·R·H  (float32 d hidden accumulator; 0 when hidden is float32 or needs no gradient)
            + 4·V + 4·Vc + 4·Vc·ceil(R / 16)  (float32 d bias, one chunk's column sums and their per-row-block
              partials, only with a bias gradient)
With a frozen bf16 head that is ≤ 1 % of the [N, V] float32 logits whenever R ≥ 1024 allows it (H = 4096: from
N = 4096 at V = 128256). A trained head costs 4·N·H + 2·N·Vc: (H + Vc/2)/V of the logits, 4.0 % at H = 4096,
V = 128256 (2.0 % at V = 262144). The float32 d hidden accumulator is the floor there: with both gradients, one of
them must accumulate across the outer loop — d hidden across vocab chunks ([N, H] float32) or d W across row chunks
([V, H] float32, larger) — and the alternatives give up something stated elsewhere: bf16 accumulation (one
rounding per chunk), atomics (nondeterministic) or a second recompute pass (5 GEMM-equivalents).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, cdiv, check_lse, empty_f32, interp_store_dtype, is_empty, maybe_autotune, next_pow2, split_lse,
)
from .linear_logprobs_launch import (
    _INTERP_MM, _INTERP_TILE, _SMALL_MM, _SMALL_TILE, _cublas_f32_accumulate_ok, _launch, _mm_configs, _prune_mm,
    _prune_tile, _tile_configs,
)
from .linear_logprobs_tile import _GROUP_N, _TILE_KEY, _grouped_pid, _tile_logits


@triton.jit
def _grad_chunk_kernel(
    x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, glp_ptr, gent_ptr, ent_ptr, scale_ptr, g_ptr, dbias_ptr,
    N, V, H, n_bucket, c0, vc, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G[:, j - c0] = g_z / T for the columns j in [c0, c0 + vc); d bias partial sums per row block."""
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = _grouped_pid(pid, n_rb, tl.cdiv(vc, BLOCK_V), GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = (c0 + local).to(tl.int64)
    c_hi = tl.minimum(c0 + vc, V)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    lse_hi, lse_lo = split_lse(tl.load(lse_ptr + rows, mask=row_ok, other=0.0))
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    if HAS_SCALE:
        g_lp = g_lp * tl.load(scale_ptr)
    # ignored rows: no gradient; a target outside [0, V): NaN log-prob, no log-prob gradient (docs/backends.md)
    g_lp = tl.where(valid & (tgt >= 0) & (tgt < V), g_lp, 0.0)

    # a row block whose targets are all ignore_index (e.g. prompt tokens) skips the product: its gradient is 0
    k_iters = tl.where(tl.sum(valid.to(tl.int32), 0) > 0, tl.cdiv(H, BLOCK_K), 0)
    z = _tile_logits(x_ptr, w_ptr, b_ptr, rows, cols, N, c_hi, H, k_iters, inv_temp,
                     HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_K)
    logp = (z - lse_hi[:, None]) - lse_lo[:, None]
    p = tl.exp(logp)
    p = tl.where(valid[:, None], p, 0.0)  # ignored rows: lse is 0, p may overflow; their gradient is 0 anyway
    g = g_lp[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if WITH_ENTROPY:
        g_h = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        if HAS_SCALE:
            g_h = g_h * tl.load(scale_ptr)
        g_h = tl.where(valid, g_h, 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g -= g_h[:, None] * tl.where(p > 0, p * (logp + ent[:, None]), 0.0)
    g = g * inv_temp
    col_ok = cols < c_hi
    tl.store(g_ptr + rows[:, None] * vc + local[None, :].to(tl.int64), g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (local[None, :] < vc))
    if NEED_BIAS:
        tl.store(dbias_ptr + pid_n.to(tl.int64) * vc + local, tl.sum(g, 0), mask=col_ok & (local < vc))


_grad_chunk_tuned = maybe_autotune(_tile_configs(), key=_TILE_KEY, prune=_prune_tile)(_grad_chunk_kernel)


@triton.jit
def _acc_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, K2, K, stride_am, m_bucket,
    DOT_F32: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[M, K2] (float32) += A[M, K] @ B[K, K2]; row-major, A with row stride stride_am, B and C contiguous."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K2, BLOCK_N), GROUP_N)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + ks[:, None].to(tl.int64) * K2 + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = (k * BLOCK_K + ks) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn[None, :] < K2), other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * K2
    c_ptrs = c_ptr + rm[:, None] * K2 + rn[None, :]
    c_ok = (rm[:, None] < M) & (rn[None, :] < K2)
    tl.store(c_ptrs, tl.load(c_ptrs, mask=c_ok, other=0.0) + acc, mask=c_ok)


_acc_matmul_tuned = maybe_autotune(
    _mm_configs(), key=["m_bucket", "K2", "K", "DOT_F32"], prune=_prune_mm, restore_value=["c_ptr"]
)(_acc_matmul_kernel)


# d hidden += G @ W[chunk] with a float32 accumulator: "auto" uses cuBLAS (torch.addmm with out_dtype=float32, in
# place) on CUDA when this torch has it and a one-time check on the device passes, else the Triton GEMM below;
# "triton" forces the Triton GEMM (benchmarks/gpu_logprobs.py times both).
_DH_GEMM = "auto"


def _acc_matmul(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c += a @ b with c float32 (float32 accumulation; no [M, K2] temporary). a may have a row stride."""
    if (c.is_cuda and not INTERPRET and _DH_GEMM == "auto" and a.dtype in (torch.bfloat16, torch.float16)
            and _cublas_f32_accumulate_ok(c.device.index if c.device.index is not None else torch.cuda.current_device())):
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return
    M, K = a.shape
    K2 = b.shape[1]
    assert a.stride(1) == 1 and b.is_contiguous() and c.is_contiguous()
    dot_f32 = INTERPRET or a.dtype == torch.float32
    args = (a, b, c, M, K2, K, a.stride(0), min(next_pow2(M), 8192))
    _launch(_acc_matmul_kernel, _acc_matmul_tuned, lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K2, meta["BLOCK_N"]),),
            args, dict(DOT_F32=dot_f32, GROUP_N=_GROUP_N), M * K * K2, (_INTERP_MM, {}) if INTERPRET else _SMALL_MM)


# The backward's extra memory target: this fraction of the [N, V] float32 logits (see backward_plan).
_EXTRA_FRACTION = 0.01
_MIN_ROWS = 1024  # smallest row chunk on a GPU: below it the per-chunk GEMMs re-read W more than they compute


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """How the backward walks the [N, V] logits of N rows: ``rows`` per row chunk (``rows == N``: the vocab-major
    order) and ``cols`` per vocab chunk, and the exact ``extra_bytes`` that costs (module docstring)."""

    n: int
    rows: int
    cols: int
    extra_bytes: int

    @property
    def row_major(self) -> bool:
        return self.rows < self.n


def backward_plan(N: int, V: int, H: int, elem: int, hidden_fp32: bool, need_hidden: bool, need_weight: bool,
                  need_bias: bool) -> BackwardPlan:
    """Chunk sizes and extra bytes of ``linear_token_logprobs_bwd`` for hidden [N, H], weight [V, H] of element size
    ``elem`` (see the module docstring for the two orders)."""
    if INTERPRET:  # several chunks of both kinds on test shapes
        cols = min(cdiv(V, 128) * 128, 384)
    else:
        cols = cdiv(min(V, max(1024, H // 2)), 128) * 128
    acc_per_row = 4 * H if (need_hidden and not hidden_fp32) else 0
    bias_fixed = 4 * V + 4 * cols if need_bias else 0  # float32 d bias and one chunk's column sums
    bias_per_16_rows = 4 * cols if need_bias else 0  # per-row-block partial sums
    if need_weight or not need_hidden or N == 0:
        rows = N
    elif INTERPRET:
        rows = min(N, 32)
    else:
        budget = _EXTRA_FRACTION * 4 * N * V - bias_fixed
        rows = int(budget // (cols * elem + acc_per_row + bias_per_16_rows / 16)) // 128 * 128
        rows = min(N, max(rows, _MIN_ROWS))
        if rows < N:  # equal chunks: never a last chunk of a few rows that re-reads all of W
            k = cdiv(N, rows)
            rows = cdiv(cdiv(N, k), 128) * 128
    extra = rows * cols * elem + rows * acc_per_row + bias_fixed + bias_per_16_rows * cdiv(rows, 16)
    return BackwardPlan(n=N, rows=rows, cols=cols, extra_bytes=extra)


@torch.no_grad()
def _backward(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
              need_hidden, need_weight, need_bias, scale=None):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_bias = bool(need_bias and bias is not None)
    with_entropy = not is_empty(grad_entropy)
    if with_entropy and is_empty(entropy):
        raise ValueError("linear_token_logprobs_bwd: grad_entropy given but the forward entropy is empty")
    check_lse("linear_token_logprobs_bwd", lse)
    hidden_fp32 = hidden.dtype == torch.float32
    plan = backward_plan(N, V, H, weight.element_size(), hidden_fp32, need_hidden, need_weight, need_bias)
    rows, vc = plan.rows, plan.cols
    gw = torch.empty_like(weight) if need_weight else empty_f32(dev)
    gb32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else empty_f32(dev)
    if not need_hidden:
        gh = acc = empty_f32(dev)
    elif hidden_fp32:
        gh = acc = torch.zeros(N, H, dtype=torch.float32, device=dev)  # the output accumulates in place
    elif plan.row_major:
        gh = torch.empty_like(hidden)
        acc = torch.empty(rows, H, dtype=torch.float32, device=dev)  # one row chunk's, reused
    else:
        gh = acc = torch.zeros(N, H, dtype=torch.float32, device=dev)  # cast to hidden's dtype at the end
    chunk_acc = need_hidden and plan.row_major and not hidden_fp32
    if N == 0 or not (need_hidden or need_weight or need_bias):
        if need_weight:
            gw.zero_()
        return (gh.to(hidden.dtype) if need_hidden else gh, gw, gb32.to(bias.dtype) if need_bias else gb32)

    G = torch.empty(rows, vc, dtype=interp_store_dtype(weight.dtype), device=dev)
    dot_f32 = INTERPRET or hidden_fp32
    dbias_part = torch.empty(cdiv(rows, 16), vc, dtype=torch.float32, device=dev) if need_bias else gb32
    dbias_chunk = torch.empty(vc, dtype=torch.float32, device=dev) if need_bias else gb32
    flags = dict(HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, HAS_SCALE=scale is not None,
                 NEED_BIAS=need_bias, DOT_F32=dot_f32, GROUP_N=_GROUP_N)

    for r0 in range(0, N, rows):
        n = min(rows, N - r0)
        sl = slice(r0, r0 + n)
        if need_hidden:
            acc_r = acc[:n] if chunk_acc else acc[sl]
            if plan.row_major:
                acc_r.zero_()
        h_r = hidden[sl]
        for c0 in range(0, V, vc):
            width = min(vc, V - c0)
            Gc = G[:n, :width]  # a strided view (row stride vc) on the last vocab chunk
            args = (h_r, weight, bias if bias is not None else hidden, targets[sl], lse[sl], grad_logprobs[sl],
                    grad_entropy[sl] if with_entropy else grad_logprobs, entropy[sl] if with_entropy else lse,
                    scale if scale is not None else lse, G, dbias_part,
                    n, V, H, min(next_pow2(n), 8192), c0, vc, 1.0 / float(temperature), int(ignore_index))
            meta = _launch(_grad_chunk_kernel, _grad_chunk_tuned,
                           lambda meta: (cdiv(n, meta["BLOCK_N"]) * cdiv(vc, meta["BLOCK_V"]),), args, flags,
                           n * vc * H, (_INTERP_TILE, {}) if INTERPRET else _SMALL_TILE)
            if G.dtype != weight.dtype:  # interpreter: round to bf16 like a GPU store (see _common)
                Gc = Gc.to(weight.dtype)
            if need_weight:  # vocab-major: all N rows are in G, so d W[chunk] is complete
                torch.mm(Gc.t(), h_r, out=gw[c0:c0 + width])
            if need_hidden:
                _acc_matmul(acc_r, Gc, weight[c0:c0 + width])
            if need_bias:
                torch.sum(dbias_part[:cdiv(n, meta["BLOCK_N"]), :width], dim=0, out=dbias_chunk[:width])
                gb32[c0:c0 + width].add_(dbias_chunk[:width])
        if chunk_acc:
            gh[sl].copy_(acc_r)

    if need_hidden and not hidden_fp32 and not plan.row_major:
        gh = acc.to(hidden.dtype)
    gb = gb32.to(bias.dtype) if need_bias else gb32
    return gh, gw, gb


def linear_token_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                              ignore_index, need_hidden, need_weight, need_bias):
    """-> (grad_hidden [N, H] hidden.dtype | empty, grad_weight [V, H] weight.dtype | empty,
    grad_bias [V] bias.dtype | empty). See the module docstring for the memory bound."""
    return _backward(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                     ignore_index, need_hidden, need_weight, need_bias)

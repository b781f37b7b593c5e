"""Triton kernels: per-token log-probs (+ entropy) from hidden states and the LM head, without [N, V] logits.

Family ``linear_logprobs`` of docs/backends.md. With z = (hidden @ weight.T + bias) / T, lse = logsumexp(z),
p = softmax(z), H = -sum p log p: logprobs_i = z_{i,t_i} - lse_i, entropy_i = H_i (0 for ignored rows) and, with
g_z = g_lp (delta - p) - g_H p (log p + H) (0 for ignored rows):
d hidden = (g_z / T) @ W,  d W = (g_z / T)^T @ hidden,  d b = sum_i g_z / T.

Forward (``linear_token_logprobs_fwd``): one kernel over tiles of [BLOCK_N x BLOCK_V] logits, each computed with
``tl.dot`` over H (float32 accumulation; bf16/fp16 operands on a GPU, float32 with input_precision="ieee" for float32
inputs), reduced at once into an online log-sum-exp (running max m, s = sum e^{z-m}, t = sum e^{z-m}(z-m), see
kernels/logprobs.py) and the target logit. The vocabulary is cut into SPLIT ranges so the grid fills the GPU; each
program walks its range and writes (m, s, t) for its rows; a small kernel merges the SPLIT partials per row.
Programs are ordered in groups of row blocks so a vocab tile is reused from L2 by the rows that need it. A row block
whose targets are all ignore_index (prompt tokens, padding) skips its tiles, here and in the backward recompute.

Work: 4 GEMM-equivalents of 2·N·V·H flops (forward, recompute, d hidden, d weight; 3 with a frozen head); the
row-major order re-reads W once per row chunk.

The backward (``linear_token_logprobs_bwd``: the logits recomputed in chunks, its two orders and their exact extra
memory) is :mod:`.linear_logprobs_bwd`; the logits tile both compute is :mod:`.linear_logprobs_tile`; how the
kernels are launched (autotune configs, the vocab split, the cuBLAS probe) is :mod:`.linear_logprobs_launch`.

Forward extra memory (beyond inputs, outputs and a few [N] float32 vectors): 12·N·SPLIT + 4·N bytes (SPLIT ≤
ceil(V / 256), about 8 × SM count / (N / 128); a few MiB).

int64 offsets everywhere a product can pass 2^31. No host syncs. Targets outside [0, V) that are not ignore_index
give NaN log-probs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, empty_f32, maybe_autotune, next_pow2
from .linear_logprobs_bwd import (  # noqa: F401  (the family's backward; re-exported: tests and benchmarks reach it here)
    BackwardPlan, _acc_matmul, _acc_matmul_kernel, _acc_matmul_tuned, _backward, _grad_chunk_kernel, _grad_chunk_tuned,
    backward_plan, linear_token_logprobs_bwd,
)
from .linear_logprobs_launch import (  # noqa: F401  (re-exported: tests and benchmarks reach them here)
    _INTERP_MM, _INTERP_TILE, _SMALL_MM, _SMALL_TILE, _cublas_f32_accumulate_ok, _dot_smem, _launch, _mm_configs,
    _mm_smem, _prune_mm, _prune_tile, _split_plan, _tile_configs,
)
from .linear_logprobs_tile import _GROUP_N, _NEG_BIG, _TILE_KEY, _grouped_pid, _tile_logits

__all__ = ["linear_token_logprobs_fwd", "linear_token_logprobs_bwd", "backward_plan", "BackwardPlan"]


@triton.jit
def _lse_partial_kernel(
    x_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr,
    N, V, H, n_bucket, v_per_split, n_split, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_F32: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_N)
    pid_n, pid_s = _grouped_pid(pid, n_rb, n_split, GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=ignore_index)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    # a row block whose targets are all ignore_index (e.g. prompt tokens) skips its tiles
    v_end = tl.where(tl.sum((tgt != ignore_index).to(tl.int32), 0) > 0, v_hi, v_lo)

    m = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _tile_logits(x_ptr, w_ptr, b_ptr, rows, cols.to(tl.int64), N, v_hi, H, tl.cdiv(H, BLOCK_K), inv_temp,
                         HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_K)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if WITH_ENTROPY:
            t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(p > 0, p * (z - m_new[:, None]), 0.0), 1)
        s = s * alpha + tl.sum(p, 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)

    out = pid_s.to(tl.int64) * N + rows
    row_ok = rows < N
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zt_ptr + rows, zt, mask=row_ok & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _merge_rows(m_ptr, s_ptr, t_ptr, rows, row_ok, N, n_split, WITH_ENTROPY: tl.constexpr):
    """Merge the n_split partial (m, s, t) of each row: -> (row max, log-sum, entropy) float32 vectors."""
    M = tl.full(rows.shape, _NEG_BIG, tl.float32)
    for k in range(0, n_split):
        M = tl.maximum(M, tl.load(m_ptr + k * N + rows, mask=row_ok, other=_NEG_BIG))
    S = tl.zeros(rows.shape, tl.float32)
    T = tl.zeros(rows.shape, tl.float32)
    for k in range(0, n_split):
        mk = tl.load(m_ptr + k * N + rows, mask=row_ok, other=_NEG_BIG)
        sk = tl.load(s_ptr + k * N + rows, mask=row_ok, other=0.0)
        a = tl.exp(mk - M)
        S += a * sk
        if WITH_ENTROPY:
            tk = tl.load(t_ptr + k * N + rows, mask=row_ok, other=0.0)
            T += a * (tk + (mk - M) * sk)
    log_s = tl.log(S)
    ent = log_s - T / S
    return M, log_s, ent


@triton.jit
def _merge_kernel(
    m_ptr, s_ptr, t_ptr, zt_ptr, tgt_ptr, lp_ptr, ent_ptr, lse_ptr,
    N, V, n_split, ignore_index,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    m_row, log_s, ent = _merge_rows(m_ptr, s_ptr, t_ptr, rows, row_ok, N, n_split, WITH_ENTROPY)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    valid = tgt != ignore_index
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    lp = tl.where((tgt >= 0) & (tgt < V), (zt - m_row) - log_s, float("nan"))
    tl.store(lp_ptr + rows, tl.where(valid, lp, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(valid, m_row.to(tl.float64) + log_s.to(tl.float64), 0.0), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, ent, 0.0), mask=row_ok)


_lse_partial_tuned = maybe_autotune(_tile_configs(), key=_TILE_KEY, prune=_prune_tile)(_lse_partial_kernel)


def _lse_partials(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    """Launch the tile kernel: -> (m, s, t [n_split, N] f32, zt [N] f32, n_split)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    v_per, n_split = _split_plan(N, V, dev)
    m = torch.empty(n_split, N, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    t = torch.empty_like(m) if with_entropy else m
    zt = torch.zeros(N, dtype=torch.float32, device=dev)
    dot_f32 = INTERPRET or hidden.dtype == torch.float32
    args = (hidden, weight, bias if bias is not None else hidden, targets, m, s, t, zt,
            N, V, H, min(next_pow2(N), 8192), v_per, n_split, 1.0 / float(temperature), int(ignore_index))
    flags = dict(HAS_BIAS=bias is not None, WITH_ENTROPY=bool(with_entropy), DOT_F32=dot_f32, GROUP_N=_GROUP_N)
    _launch(_lse_partial_kernel, _lse_partial_tuned, lambda meta: (cdiv(N, meta["BLOCK_N"]) * n_split,), args, flags,
            N * V * H, (_INTERP_TILE, {}) if INTERPRET else _SMALL_TILE)
    return m, s, t, zt, n_split


def linear_token_logprobs_fwd(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    """hidden [N, H], weight [V, H], bias [V] | None (same device; hidden/weight same dtype), targets [N] int64 ->
    (logprobs [N] f32, entropy [N] f32 | empty, lse [N] f64). lse is 0 on ignored rows."""
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    lp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float64, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if with_entropy else empty_f32(dev)
    if N == 0:
        return lp, ent, lse
    m, s, t, zt, n_split = _lse_partials(hidden, weight, bias, targets, temperature, ignore_index, with_entropy)
    block = 256
    _merge_kernel[(cdiv(N, block),)](
        m, s, t, zt, targets, lp, ent if with_entropy else lp, lse, N, V, n_split, int(ignore_index),
        WITH_ENTROPY=bool(with_entropy), BLOCK=block, num_warps=4,
    )
    return lp, ent, lse

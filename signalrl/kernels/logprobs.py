"""Triton kernels: per-token log-probs (+ entropy) from logits, forward and backward.

Family ``logprobs`` of docs/backends.md. With z = logits / T (T = temperature), lse = logsumexp(z),
log p_j = z_j - lse and H = -sum_j p_j log p_j:

    logprobs_i = z_{i,t_i} - lse_i          entropy_i = H_i          (0 for rows with t_i == ignore_index)
    d/dlogits_ij = (1/T) [ g_lp,i (delta_{j,t_i} - p_ij) - g_H,i p_ij (log p_ij + H_i) ]   (0 for ignored rows)

One program per row streams the vocabulary in blocks of ``BLOCK_V`` with an online log-sum-exp, in float32 for
every input dtype, kept per lane (one exp per element, lanes merged once at the end). The entropy rides along in the
same pass: besides the running max m and s = sum e^{z-m}, it keeps t = sum e^{z-m} (z - m) (shifted by the running max,
so no cancellation between lse and E[z] for large logits); rescaling to a new max m' gives
t' = e^{m-m'} (t + (m - m') s), and at the end H = log s - t / s.

The lse handed to the backward is float64 (max + log s added in float64) and the backward forms
log p = (z - hi) - lo from its float32 split (``split_lse``), so a float32 rounding of lse (|lse|·2^-24, 6e-4 at
|lse| = 1e4) never reaches p; the log-prob itself is (z_t - max) - log s.

Memory: the forward reads the logits once and writes 3 values per row; the backward reads them once and writes the
gradient once (``token_logprobs_bwd_inplace`` writes it over the logits: no [N, V] allocation at all). Ignored rows
are skipped (never read). Offsets are int64 (row * V overflows int32 at N = 32768, V = 262144). No host syncs.
A target outside [0, V) that is not ``ignore_index`` gives a NaN log-prob (a loud, sync-free signal), is never read,
and gets no log-prob gradient (the entropy term still flows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_lse, empty_f32, interp_store_dtype, is_empty, next_pow2, split_lse

__all__ = ["token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_inplace"]

_NEG_BIG = tl.constexpr(-1.0e38)  # finite "minus infinity" for the running max: keeps (m - m') * s free of inf * 0


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    lp_ptr,
    ent_ptr,
    lse_ptr,
    V,
    stride_row,
    inv_temp,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    # per-lane online state (no cross-lane reduction inside the loop, one exp per element): for each lane, running
    # max m, s = sum e^{z-m}, t = sum e^{z-m} (z - m). A new element either raises the max (d = m - z < 0: rescale by
    # e^d, then add e^0 = 1) or not (d = z - m <= 0: add e^d) — the same exp serves both.
    m = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    n_blocks = tl.where(valid, tl.cdiv(V, BLOCK_V), 0)
    # software prefetch: block b + 1 is requested before block b is reduced, so two blocks per program are in flight
    x_next = tl.load(row_ptr + cols, mask=cols < tl.where(valid, V, 0), other=float("-inf"))
    for b in range(0, n_blocks):
        x = x_next
        offs = (b + 1) * BLOCK_V + cols
        x_next = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        z = x.to(tl.float32) * inv_temp
        up = z > m
        d = tl.where(up, m - z, z - m)
        e = tl.exp(d)
        if WITH_ENTROPY:
            ed = tl.where(e > 0, e * d, 0.0)  # 0 for z = -inf (masked lanes, -inf logits)
            t = tl.where(up, e * t + ed * s, t + ed)
        s = tl.where(up, s * e + 1.0, s + e)
        m = tl.maximum(m, z)
    # merge the lanes
    m_row = tl.max(m, 0)
    a = tl.exp(m - m_row)
    s_row = tl.sum(a * s, 0)
    log_s = tl.log(s_row)
    in_range = (target >= 0) & (target < V)
    z_t = tl.load(row_ptr + tl.where(in_range & valid, target, 0), mask=in_range & valid, other=0.0)
    z_t = z_t.to(tl.float32) * inv_temp
    lp = tl.where(in_range, (z_t - m_row) - log_s, float("nan"))
    tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, m_row.to(tl.float64) + log_s.to(tl.float64), 0.0))
    if WITH_ENTROPY:
        t_row = tl.sum(a * (t + (m - m_row) * s), 0)
        tl.store(ent_ptr + row, tl.where(valid, log_s - t_row / s_row, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    out_ptr,
    targets_ptr,
    glp_ptr,
    gent_ptr,
    lse_ptr,
    ent_ptr,
    V,
    stride_row,
    stride_out,
    inv_temp,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * stride_row
    out_row = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_V)
    # a target outside [0, V) (not ignore_index) has a NaN log-prob and no log-prob gradient (docs/backends.md)
    g_lp = tl.where((target >= 0) & (target < V), tl.load(glp_ptr + row), 0.0)
    lse_hi, lse_lo = split_lse(tl.load(lse_ptr + row))
    if WITH_ENTROPY:
        g_h = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)

    n_total = tl.cdiv(V, BLOCK_V)
    n_live = tl.where(valid, n_total, 0)
    for b in range(0, n_live):
        offs = b * BLOCK_V + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        logp = (z - lse_hi) - lse_lo
        p = tl.exp(logp)
        # (delta - p) in float32, before any downcast: no cancellation for the true class in bf16
        g = g_lp * (tl.where(offs == target, 1.0, 0.0) - p)
        if WITH_ENTROPY:
            g -= g_h * tl.where(p > 0, p * (logp + ent), 0.0)
        tl.store(out_row + offs, (g * inv_temp).to(out_ptr.dtype.element_ty), mask=offs < V)
    for b in range(n_live, n_total):  # ignored rows: zeros, without reading the logits
        offs = b * BLOCK_V + cols
        tl.store(out_row + offs, tl.zeros([BLOCK_V], out_ptr.dtype.element_ty), mask=offs < V)


def _row_launch(V: int, elem_bytes: int, forward: bool = False) -> tuple[int, int]:
    """BLOCK_V and num_warps for the row-streaming kernels: 8-16 KiB of logits per block iteration. The forward keeps
    three float32 lanes of state per element (~80 registers a thread), so it uses smaller programs (several per SM)."""
    block = min(next_pow2(V), (4096 if forward else 8192) if elem_bytes <= 2 else (2048 if forward else 4096))
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def token_logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
):
    """logits [N, V] f32|bf16|f16 (rows contiguous), targets [N] int64 ->
    (logprobs [N] f32, entropy [N] f32 | empty, lse [N] f64). lse is 0 on ignored rows."""
    N, V = logits.shape
    dev = logits.device
    lp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float64, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if with_entropy else empty_f32(dev)
    if N == 0:
        return lp, ent, lse
    block, warps = _row_launch(V, logits.element_size(), forward=True)
    _token_logprobs_fwd_kernel[(N,)](
        logits,
        targets,
        lp,
        ent if with_entropy else lp,
        lse,
        V,
        logits.stride(0),
        1.0 / float(temperature),
        int(ignore_index),
        WITH_ENTROPY=bool(with_entropy),
        BLOCK_V=block,
        num_warps=warps,
    )
    return lp, ent, lse


def _launch_bwd(out, grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
    check_lse("token_logprobs_bwd", lse)
    N, V = logits.shape
    if N == 0:
        return
    if interp_store_dtype(out.dtype) != out.dtype:  # interpreter: round to bf16 like a GPU (see _common)
        tmp = torch.empty(out.shape, dtype=interp_store_dtype(out.dtype), device=out.device)
        _launch_bwd(tmp, grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index)
        out.copy_(tmp)
        return
    with_entropy = not is_empty(grad_entropy)
    if with_entropy and is_empty(entropy):
        raise ValueError("token_logprobs_bwd: grad_entropy given but the forward entropy is empty")
    block, warps = _row_launch(V, logits.element_size())
    _token_logprobs_bwd_kernel[(N,)](
        logits,
        out,
        targets,
        grad_logprobs,
        grad_entropy if with_entropy else grad_logprobs,
        lse,
        entropy if with_entropy else lse,
        V,
        logits.stride(0),
        out.stride(0),
        1.0 / float(temperature),
        int(ignore_index),
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=warps,
    )


def token_logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """-> grad_logits [N, V] in logits.dtype (empty grad_entropy: no entropy term)."""
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch_bwd(out, grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index)
    return out


def token_logprobs_bwd_inplace(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> None:
    """Same as ``token_logprobs_bwd`` but writes the gradient over ``logits`` (each element is read, then written,
    by the same program, so this is race-free). The logits are gone afterwards."""
    _launch_bwd(logits, grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index)

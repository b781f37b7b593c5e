"""Triton kernels for the per-token PPO epilogue (clipped surrogate + KL + entropy bonus) and the
clipped value loss. Family ``ppo`` of :mod:`signalrl.ops._backend` (the KL estimators: :mod:`signalrl.kernels.kl`).

Every loss is a weighted token sum ``loss = Σ_i w_i·ℓ_i``; the weights ``w`` come from
``signalrl.ops.token_weights(mask, aggregation)``, so one kernel serves every
aggregation. The forward writes the per-token gradient ``w_i·∂ℓ_i/∂x_i`` in the same pass, so the
backward is one multiply by the incoming scalar gradient. Statistics are reduced in the same pass:
each program writes one row of partial sums (min/max, Welford moments for variances), then a
one-program kernel reduces the ``[programs, columns]`` table to the loss and the stats on the device
(no host sync; deterministic: no atomics; two launches in all).

Kernel functions (all 1-D contiguous ``[N]`` tensors; float32, bfloat16 or float16 inputs are
read as float32; ``weights`` and ``mask`` are float32 with mask 0/1; "empty" = a 0-element tensor).
The mask *selects*: every per-token input is read as 0 where mask = 0 (``tl.where``, never a product with
the mask), so whatever a masked position holds (NaN, ±inf) the results are those with zeros there::

    ppo_token_fwd(logprobs, old_logprobs, advantages, weights, mask,
                  ref_logprobs | None | empty, entropy | None | empty,
                  clip_low: float, clip_high: float, dual_clip: float | None,
                  kl_estimator: str, kl_coef: float, entropy_coef: float, log_ratio_clamp: float | None = None)
        -> (loss[] f32, grad_logprobs[N] f32, grad_entropy[N] f32 | empty, stats[9] f32)

      log ρ = lp − old, clamped to [−c, c] for log_ratio_clamp c (no gradient where the clamp is active);
      ρ = exp(log ρ); ℓ_pg = max(−A·ρ, −A·clip(ρ, 1−clip_low, 1+clip_high)), and ℓ_pg = 0 with zero gradient
      where A = 0 (whatever ρ: no 0·inf); dual-clip c: where A < 0, ℓ_pg = min(ℓ_pg, −A·c);
      ℓ = ℓ_pg + kl_coef·KL_est(lp − ref) [if ref given] − entropy_coef·H [if entropy given].
      grad_logprobs = w·∂ℓ/∂lp, grad_entropy = w·∂ℓ/∂H = −entropy_coef·w. Ties of max/min split the
      gradient in halves and clamp passes it on its closed interval, exactly like torch autograd.
      stats, in the order of PPO_STAT_KEYS: clip_fraction, dual_clip_fraction, approx_kl
      (mean of ρ − 1 − log ρ), ratio_mean, ratio_min, ratio_max (0 when no token counts),
      pg_loss (Σ w·ℓ_pg), entropy (masked mean, 0 without entropy), kl (masked mean, 0 without ref).
      Means are over tokens with mask 1 (denominator clamped to ≥ 1).

    value_loss_fwd(values, old_values, returns, weights, mask, clip: float | None)
        -> (loss[] f32, grad_values[N] f32, stats[4] f32)

      v_c = old + clip(v − old, −c, c); ℓ = ½·max((v − R)², (v_c − R)²)  (½·(v − R)² without clip);
      grad_values = w·∂ℓ/∂v. stats in the order of VALUE_STAT_KEYS: value_clip_fraction (tokens
      with |v − old| > c whose clipped error is the larger),
      explained_variance (1 − Var(R − v)/Var(R), 0 when Var(R) = 0), value_mean, return_mean.

Per-token math (device functions): :mod:`signalrl.kernels.ppo_math`.

Memory: the outputs ([N] float32 gradients) plus a ``[programs, ≤ 11]`` float32 partial table;
programs ≤ 4 × SM count on a GPU (each program loops over blocks).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..reference.stat_keys import PPO_STAT_KEYS, VALUE_STAT_KEYS
from .kl import KL_CODES, _kl_code, kl_penalty_bwd, kl_penalty_fwd  # noqa: F401  (the KL ops lived here: re-exported)
from .ppo_math import _nan_max, _nan_min, _ppo_token_math, _value_token_math

__all__ = ["KL_CODES", "PPO_STAT_KEYS", "VALUE_STAT_KEYS", "ppo_token_fwd", "value_loss_fwd"]

_BLOCK = 1024
_FINISH_BLOCK = 256
_NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _ppo_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, m_ptr, ref_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, part_ptr,
    N, blocks_per_prog, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, lr_clamp,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_LR_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    zero = tl.zeros([BLOCK], tl.float32)
    acc_loss, acc_pg, acc_n, acc_clip, acc_dual = zero, zero, zero, zero, zero
    acc_akl, acc_ratio, acc_kl, acc_ent = zero, zero, zero, zero
    r_min = zero + float("inf")
    r_max = zero - float("inf")
    for i in range(0, blocks_per_prog):
        offs = (pid + i * nprog).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        sel = m != 0.0  # per-token inputs are selected, never multiplied by the mask (NaN·0 = NaN)
        lp = tl.where(sel, tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        old = tl.where(sel, tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        adv = tl.where(sel, tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        if HAS_REF:
            ref = tl.where(sel, tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        else:
            ref = zero
        if HAS_ENT:
            ent = tl.where(sel, tl.load(ent_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        else:
            ent = zero
        loss, pg, g_lp, g_ent, ratio, akl, cflag, dflag, kl = _ppo_token_math(
            lp, old, adv, ref, ent, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, lr_clamp,
            HAS_DUAL, HAS_REF, KL_EST, HAS_ENT, HAS_LR_CLAMP,
        )
        tl.store(g_lp_ptr + offs, w * g_lp, mask=inb)
        if HAS_ENT:
            tl.store(g_ent_ptr + offs, w * g_ent, mask=inb)
        acc_loss += w * loss
        acc_pg += w * pg
        acc_n += m
        acc_clip += m * cflag.to(tl.float32)
        acc_dual += m * dflag.to(tl.float32)
        acc_akl += m * akl
        acc_ratio += m * ratio
        counted = inb & (m > 0)
        r_min = _nan_min(r_min, tl.where(counted, ratio, float("inf")))  # a counted NaN ratio makes the stat NaN
        r_max = _nan_max(r_max, tl.where(counted, ratio, -float("inf")))
        if HAS_REF:
            acc_kl += m * kl
        if HAS_ENT:
            acc_ent += m * ent
    row = part_ptr + pid * 11
    tl.store(row + 0, tl.sum(acc_loss, axis=0))
    tl.store(row + 1, tl.sum(acc_pg, axis=0))
    tl.store(row + 2, tl.sum(acc_n, axis=0))
    tl.store(row + 3, tl.sum(acc_clip, axis=0))
    tl.store(row + 4, tl.sum(acc_dual, axis=0))
    tl.store(row + 5, tl.sum(acc_akl, axis=0))
    tl.store(row + 6, tl.sum(acc_ratio, axis=0))
    tl.store(row + 7, tl.reduce(r_min, 0, _nan_min))
    tl.store(row + 8, tl.reduce(r_max, 0, _nan_max))
    tl.store(row + 9, tl.sum(acc_kl, axis=0))
    tl.store(row + 10, tl.sum(acc_ent, axis=0))


@triton.jit
def _value_fwd_kernel(
    v_ptr, old_ptr, ret_ptr, w_ptr, m_ptr, g_v_ptr, part_ptr,
    N, blocks_per_prog, clip,
    HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    zero = tl.zeros([BLOCK], tl.float32)
    acc_loss, acc_clip, acc_v = zero, zero, zero
    # running Welford moments (count, mean, M2) of R and of e = R − v over counted tokens
    n_run = tl.sum(zero, axis=0)
    mean_r, m2_r, mean_e, m2_e = n_run, n_run, n_run, n_run
    for i in range(0, blocks_per_prog):
        offs = (pid + i * nprog).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        sel = m != 0.0  # selected, never multiplied by the mask
        v = tl.where(sel, tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        ret = tl.where(sel, tl.load(ret_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        if HAS_CLIP:
            old = tl.where(sel, tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        else:
            old = zero
        loss, g, flag = _value_token_math(v, old, ret, clip, HAS_CLIP)
        tl.store(g_v_ptr + offs, w * g, mask=inb)
        acc_loss += w * loss
        acc_clip += m * flag.to(tl.float32)
        acc_v += m * v
        e = ret - v
        n_b = tl.sum(m, axis=0)
        inv_b = 1.0 / tl.maximum(n_b, 1.0)
        mr_b = tl.sum(m * ret, axis=0) * inv_b
        me_b = tl.sum(m * e, axis=0) * inv_b
        m2r_b = tl.sum(m * (ret - mr_b) * (ret - mr_b), axis=0)
        m2e_b = tl.sum(m * (e - me_b) * (e - me_b), axis=0)
        n_new = n_run + n_b
        frac = n_b / tl.maximum(n_new, 1.0)
        d_r = mr_b - mean_r
        d_e = me_b - mean_e
        mean_r = mean_r + d_r * frac
        mean_e = mean_e + d_e * frac
        m2_r = m2_r + m2r_b + d_r * d_r * n_run * frac
        m2_e = m2_e + m2e_b + d_e * d_e * n_run * frac
        n_run = n_new
    row = part_ptr + pid * 8
    tl.store(row + 0, tl.sum(acc_loss, axis=0))
    tl.store(row + 1, n_run)
    tl.store(row + 2, tl.sum(acc_clip, axis=0))
    tl.store(row + 3, tl.sum(acc_v, axis=0))
    tl.store(row + 4, mean_r)
    tl.store(row + 5, m2_r)
    tl.store(row + 6, mean_e)
    tl.store(row + 7, m2_e)


@triton.jit
def _ppo_finish_kernel(part_ptr, P, loss_ptr, stats_ptr, BLOCK_P: tl.constexpr):
    """One program: reduce the [P, 11] partial rows to the loss and the 9 stats (no host round trip)."""
    offs0 = tl.arange(0, BLOCK_P)
    zero = tl.zeros([BLOCK_P], tl.float32)
    s_loss, s_pg, s_n, s_clip, s_dual, s_akl, s_ratio, s_kl, s_ent = zero, zero, zero, zero, zero, zero, zero, zero, zero
    r_min = zero + float("inf")
    r_max = zero - float("inf")
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + offs0
        ok = offs < P
        row = part_ptr + offs.to(tl.int64) * 11
        s_loss += tl.load(row + 0, mask=ok, other=0.0)
        s_pg += tl.load(row + 1, mask=ok, other=0.0)
        s_n += tl.load(row + 2, mask=ok, other=0.0)
        s_clip += tl.load(row + 3, mask=ok, other=0.0)
        s_dual += tl.load(row + 4, mask=ok, other=0.0)
        s_akl += tl.load(row + 5, mask=ok, other=0.0)
        s_ratio += tl.load(row + 6, mask=ok, other=0.0)
        r_min = _nan_min(r_min, tl.load(row + 7, mask=ok, other=float("inf")))
        r_max = _nan_max(r_max, tl.load(row + 8, mask=ok, other=-float("inf")))
        s_kl += tl.load(row + 9, mask=ok, other=0.0)
        s_ent += tl.load(row + 10, mask=ok, other=0.0)
    count = tl.sum(s_n, axis=0)
    inv = 1.0 / tl.maximum(count, 1.0)
    tl.store(loss_ptr, tl.sum(s_loss, axis=0))
    tl.store(stats_ptr + 0, tl.sum(s_clip, axis=0) * inv)
    tl.store(stats_ptr + 1, tl.sum(s_dual, axis=0) * inv)
    tl.store(stats_ptr + 2, tl.sum(s_akl, axis=0) * inv)
    tl.store(stats_ptr + 3, tl.sum(s_ratio, axis=0) * inv)
    tl.store(stats_ptr + 4, tl.where(count > 0, tl.reduce(r_min, 0, _nan_min), 0.0))
    tl.store(stats_ptr + 5, tl.where(count > 0, tl.reduce(r_max, 0, _nan_max), 0.0))
    tl.store(stats_ptr + 6, tl.sum(s_pg, axis=0))
    tl.store(stats_ptr + 7, tl.sum(s_ent, axis=0) * inv)
    tl.store(stats_ptr + 8, tl.sum(s_kl, axis=0) * inv)


@triton.jit
def _value_finish_kernel(part_ptr, P, loss_ptr, stats_ptr, TINY: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: merge the [P, 8] partial rows (Chan's parallel variance) into the loss and the 4 stats."""
    offs0 = tl.arange(0, BLOCK_P)
    zero = tl.zeros([BLOCK_P], tl.float32)
    s_loss, s_clip, s_v = zero, zero, zero
    n_run = tl.sum(zero, axis=0)
    mean_r, m2_r, mean_e, m2_e = n_run, n_run, n_run, n_run
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + offs0
        ok = offs < P
        row = part_ptr + offs.to(tl.int64) * 8
        s_loss += tl.load(row + 0, mask=ok, other=0.0)
        n_p = tl.load(row + 1, mask=ok, other=0.0)
        s_clip += tl.load(row + 2, mask=ok, other=0.0)
        s_v += tl.load(row + 3, mask=ok, other=0.0)
        mr_p = tl.load(row + 4, mask=ok, other=0.0)
        m2r_p = tl.load(row + 5, mask=ok, other=0.0)
        me_p = tl.load(row + 6, mask=ok, other=0.0)
        m2e_p = tl.load(row + 7, mask=ok, other=0.0)
        # this chunk of programs as one group, then merged into the running moments
        n_c = tl.sum(n_p, axis=0)
        inv_c = 1.0 / tl.maximum(n_c, 1.0)
        mr_c = tl.sum(n_p * mr_p, axis=0) * inv_c
        me_c = tl.sum(n_p * me_p, axis=0) * inv_c
        m2r_c = tl.sum(m2r_p + n_p * (mr_p - mr_c) * (mr_p - mr_c), axis=0)
        m2e_c = tl.sum(m2e_p + n_p * (me_p - me_c) * (me_p - me_c), axis=0)
        n_new = n_run + n_c
        frac = n_c / tl.maximum(n_new, 1.0)
        d_r = mr_c - mean_r
        d_e = me_c - mean_e
        mean_r = mean_r + d_r * frac
        mean_e = mean_e + d_e * frac
        m2_r = m2_r + m2r_c + d_r * d_r * n_run * frac
        m2_e = m2_e + m2e_c + d_e * d_e * n_run * frac
        n_run = n_new
    inv = 1.0 / tl.maximum(n_run, 1.0)
    # the reference's form: unbiased variances, the ratio guarded by the smallest normal float
    bessel = tl.maximum(n_run - 1.0, 1.0)
    var_r = m2_r / bessel
    ev = 1.0 - (m2_e / bessel) / tl.maximum(var_r, TINY)
    tl.store(loss_ptr, tl.sum(s_loss, axis=0))
    tl.store(stats_ptr + 0, tl.sum(s_clip, axis=0) * inv)
    tl.store(stats_ptr + 1, tl.where(var_r > 0, ev, 0.0))
    tl.store(stats_ptr + 2, tl.sum(s_v, axis=0) * inv)
    tl.store(stats_ptr + 3, mean_r)


# ----------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _max_programs(device_index: int) -> int:
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(n: int, device: torch.device, block: int, programs: int | None) -> tuple[int, int]:
    """(programs, blocks per program) for a persistent 1-D launch over n elements (≥ 1 program)."""
    blocks = triton.cdiv(n, block)
    if programs is None:
        programs = _max_programs(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else blocks
    programs = max(1, min(programs, blocks))
    return programs, triton.cdiv(blocks, programs)


def _present(t: torch.Tensor | None) -> bool:
    return t is not None and t.numel() > 0


def ppo_token_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_estimator: str,
    kl_coef: float,
    entropy_coef: float,
    log_ratio_clamp: float | None = None,
    *,
    _block: int = _BLOCK,
    _programs: int | None = None,
    _finish_block: int = _FINISH_BLOCK,
):
    """Fused PPO token epilogue; see the module docstring for the math and the outputs.
    ``_block``, ``_programs``, ``_finish_block`` override the launch (tests)."""
    n = logprobs.numel()
    dev = logprobs.device
    has_ref, has_ent = _present(ref_logprobs), _present(entropy)
    programs, per_prog = _grid(n, dev, _block, _programs)
    g_lp = torch.empty(n, dtype=torch.float32, device=dev)
    g_ent = torch.empty(n if has_ent else 0, dtype=torch.float32, device=dev)
    part = torch.empty(programs, 11, dtype=torch.float32, device=dev)
    _ppo_fwd_kernel[(programs,)](
        logprobs, old_logprobs, advantages, weights, mask,
        ref_logprobs if has_ref else logprobs, entropy if has_ent else logprobs,
        g_lp, g_ent if has_ent else g_lp, part,
        n, per_prog, float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef), float(entropy_coef),
        float(log_ratio_clamp or 0.0),
        HAS_DUAL=dual_clip is not None, HAS_REF=has_ref, KL_EST=_kl_code(kl_estimator), HAS_ENT=has_ent,
        HAS_LR_CLAMP=log_ratio_clamp is not None, BLOCK=_block, num_warps=_NUM_WARPS,
    )
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(len(PPO_STAT_KEYS), dtype=torch.float32, device=dev)
    _ppo_finish_kernel[(1,)](part, programs, loss, stats, BLOCK_P=_finish_block, num_warps=_NUM_WARPS)
    return loss, g_lp, g_ent, stats


def value_loss_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    *,
    _block: int = _BLOCK,
    _programs: int | None = None,
    _finish_block: int = _FINISH_BLOCK,
):
    """Fused clipped value loss; see the module docstring for the math and the outputs."""
    n = values.numel()
    dev = values.device
    programs, per_prog = _grid(n, dev, _block, _programs)
    g_v = torch.empty(n, dtype=torch.float32, device=dev)
    part = torch.empty(programs, 8, dtype=torch.float32, device=dev)
    _value_fwd_kernel[(programs,)](
        values, old_values, returns, weights, mask, g_v, part,
        n, per_prog, float(clip or 0.0),
        HAS_CLIP=clip is not None, BLOCK=_block, num_warps=_NUM_WARPS,
    )
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(len(VALUE_STAT_KEYS), dtype=torch.float32, device=dev)
    _value_finish_kernel[(1,)](
        part, programs, loss, stats, TINY=torch.finfo(torch.float32).tiny, BLOCK_P=_finish_block, num_warps=_NUM_WARPS
    )
    return loss, g_v, stats

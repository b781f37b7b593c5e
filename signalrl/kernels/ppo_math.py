"""Per-token PPO math as Triton device functions: what the kernels of :mod:`signalrl.kernels.ppo` apply to each
token before they reduce (the math and its gradients: that module's docstring and docs/backends.md, family ppo).

Device functions (the KL estimators: ``_kl_math`` of :mod:`signalrl.kernels.kl`)::

    _ppo_token_math(lp, old, adv, ref, ent, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, lr_clamp,
                    HAS_DUAL, HAS_REF, KL_EST, HAS_ENT, HAS_LR_CLAMP)
        -> (loss, pg_loss, g_lp, g_ent, ratio, approx_kl, clip_flag, dual_flag, kl)   per token, unweighted
    _value_token_math(v, old, ret, clip, HAS_CLIP) -> (loss, g_v, clip_flag)       per token, unweighted
    _nan_min(a, b), _nan_max(a, b)   NaN-propagating minimum / maximum (torch.amin / amax semantics)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kl import _kl_math


@triton.jit
def _ppo_token_math(
    lp, old, adv, ref, ent, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, lr_clamp,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr, HAS_ENT: tl.constexpr,
    HAS_LR_CLAMP: tl.constexpr,
):
    """Per-token PPO loss and its derivatives (unweighted); see the module docstring."""
    log_ratio = lp - old
    if HAS_LR_CLAMP:
        lr_free = (log_ratio >= -lr_clamp) & (log_ratio <= lr_clamp)  # torch.clamp passes the gradient here
        log_ratio = tl.clamp(log_ratio, -lr_clamp, lr_clamp, propagate_nan=tl.PropagateNan.ALL)
    ratio = tl.exp(log_ratio)
    r = tl.where(adv == 0.0, 1.0, ratio)  # A = 0: ℓ_pg = −0·1 = 0 and no gradient, whatever ρ (no 0·inf)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    unclipped = -adv * r
    clipped = -adv * tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
    g_un = unclipped  # ∂(−A·ρ)/∂lp = −A·ρ
    g_cl = tl.where((r >= lo) & (r <= hi), g_un, 0.0)
    pg = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    g_lp = tl.where(unclipped > clipped, g_un, tl.where(clipped > unclipped, g_cl, 0.5 * (g_un + g_cl)))
    clip_flag = clipped > unclipped
    if HAS_DUAL:
        bound = -adv * dual_clip
        neg = adv < 0
        dual_flag = neg & (pg > bound)
        g_lp = tl.where(neg, tl.where(pg < bound, g_lp, tl.where(pg > bound, 0.0, 0.5 * g_lp)), g_lp)
        pg = tl.where(neg, tl.minimum(pg, bound, propagate_nan=tl.PropagateNan.ALL), pg)
    else:
        dual_flag = tl.zeros(lp.shape, tl.int1)
    if HAS_LR_CLAMP:
        g_lp = tl.where(lr_free, g_lp, 0.0)
    loss = pg
    if HAS_REF:  # a zero coefficient drops the term, as the reference does (0·inf would be NaN)
        kl, g_kl = _kl_math(lp - ref, KL_EST)
        loss = tl.where(kl_coef != 0.0, loss + kl_coef * kl, loss)
        g_lp = tl.where(kl_coef != 0.0, g_lp + kl_coef * g_kl, g_lp)
    else:
        kl = tl.zeros(lp.shape, tl.float32)
    if HAS_ENT:
        loss = tl.where(entropy_coef != 0.0, loss - entropy_coef * ent, loss)
        g_ent = tl.full(lp.shape, 0.0, tl.float32) - entropy_coef
    else:
        g_ent = tl.zeros(lp.shape, tl.float32)
    approx_kl = ratio - 1.0 - log_ratio
    return loss, pg, g_lp, g_ent, ratio, approx_kl, clip_flag, dual_flag, kl


@triton.jit
def _value_token_math(v, old, ret, clip, HAS_CLIP: tl.constexpr):
    """Per-token clipped value loss, its derivative in v, and the clip flag (unweighted)."""
    diff = v - ret
    err = diff * diff
    if HAS_CLIP:
        dv = v - old
        dc = (old + tl.clamp(dv, -clip, clip, propagate_nan=tl.PropagateNan.ALL)) - ret
        err_c = dc * dc
        inside = (dv >= -clip) & (dv <= clip)
        g_c = tl.where(inside, dc, 0.0)
        loss = 0.5 * tl.maximum(err, err_c, propagate_nan=tl.PropagateNan.ALL)
        g = tl.where(err > err_c, diff, tl.where(err_c > err, g_c, 0.5 * (diff + g_c)))
        # inside the clip range v_c = v up to one rounding of old + (v − old): not a clipped token
        flag = (err_c > err) & ((dv < -clip) | (dv > clip))
    else:
        loss = 0.5 * err
        g = diff
        flag = tl.zeros(v.shape, tl.int1)
    return loss, g, flag


@triton.jit
def _nan_min(a, b):
    """min that keeps a NaN (torch.amin's semantics; tl.minimum/tl.min default to dropping it, as fminf does)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# ----------------------------------------------------------------------------- kernels

"""PPO objectives: clipped policy surrogate, clipped value loss, their aggregation, and the
reference composition of the fused ``linear_ppo_loss``.

All per-token arrays are ``[B, T]`` (a 1-D ``[N]`` input is treated as one row) with ``mask``
1 where a token counts. Statistics are returned as 0-d tensors (no host sync).

Masks *select*: every per-token input is replaced by 0 outside the mask (``torch.where``, never a
product with the mask, since NaN·0 = NaN), so whatever a masked position holds (NaN, ±inf, 1e30), the
loss, the statistics and the gradients equal those computed with zeros there, and the gradient at a
masked position is exactly 0.
"""
from __future__ import annotations

import math

import torch

from ._dtype import acc_dtype
from .kl import kl_penalty
from .logprobs import linear_token_logprobs
from .stats import masked_mean, masked_var, zero_outside

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _rows(x: torch.Tensor) -> torch.Tensor:
    # rows by the product of the leading sizes, not -1: a [0, 0] batch has no inferable row count
    return x.unsqueeze(0) if x.dim() == 1 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x) if mask is None else mask.to(x.dtype).reshape(x.shape)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar. With m the mask and B' the number of rows
    that have at least one counted token:

    - ``token-mean``:              Σ x·m / Σ m
    - ``seq-mean-token-sum``:      (1/B') Σ_rows Σ_t x·m
    - ``seq-mean-token-mean``:     (1/B') Σ_rows (Σ_t x·m / Σ_t m)
    - ``seq-mean-token-sum-norm``: Σ x·m / (B·T)   (Dr. GRPO: a constant horizon, no length bias)

    Every denominator is clamped to ≥ 1, so an all-masked batch gives 0, and so does an empty one.
    """
    m = _rows(_mask_for(per_token, mask))
    x = zero_outside(_rows(per_token), m)
    if mode == "token-mean":
        return (x * m).sum() / m.sum().clamp_min(1.0)
    row_tokens = m.sum(-1)
    rows_valid = (row_tokens > 0).to(x.dtype).sum().clamp_min(1.0)
    if mode == "seq-mean-token-sum":
        return (x * m).sum() / rows_valid
    if mode == "seq-mean-token-mean":
        return ((x * m).sum(-1) / row_tokens.clamp_min(1.0)).sum() / rows_valid
    if mode == "seq-mean-token-sum-norm":
        return (x * m).sum() / float(max(x.numel(), 1))
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {mode!r}")


def _masked_extreme(x: torch.Tensor, m: torch.Tensor, largest: bool) -> torch.Tensor:
    if x.numel() == 0:  # an empty batch: no counted token (a shape test, no sync)
        return x.new_zeros(())
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(m > 0, x, torch.full_like(x, fill))
    ext = masked.amax() if largest else masked.amin()
    return torch.where(m.sum() > 0, ext, torch.zeros_like(ext))


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    log_ratio_clamp: float | None = None,
):
    """PPO clipped surrogate. log ρ = logp − old_logp (clamped to [−c, c] when ``log_ratio_clamp``
    is c, with zero gradient where the clamp is active), ρ = exp(log ρ), A the advantages:

        ℓ = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high))
        dual-clip (c > 1): where A < 0, ℓ = min(ℓ, −A·c)

    A token with A = 0 contributes exactly 0 with zero gradient, whatever its ratio (no 0·inf = NaN).
    ``clip_high`` defaults to ``clip_low``. Returns ``(aggregate(ℓ), stats)`` with stats
    ``clip_fraction`` (tokens where the clipped branch is strictly larger), ``dual_clip_fraction``,
    ``approx_kl`` (mean of (ρ − 1) − log ρ, the k3 estimate of KL(old‖new)), ``ratio_mean``,
    ``ratio_min``, ``ratio_max`` — all over counted tokens (ρ after the clamp), as 0-d tensors.
    Gradient flows to ``logprobs`` only.
    """
    clip_high = clip_low if clip_high is None else clip_high
    dt = acc_dtype(logprobs, old_logprobs, advantages)
    m = _mask_for(logprobs.to(dt), mask)
    logp, old, adv = (zero_outside(x.to(dt), m) for x in (logprobs, old_logprobs, advantages))
    log_ratio = logp - old
    if log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    # A = 0: ρ is taken as 1 (before exp, so no inf reaches the backward): ℓ = −0·1 = 0, ∂ℓ/∂logp = 0
    ratio_pg = torch.exp(torch.where(adv != 0, log_ratio, 0.0))
    unclipped = -adv * ratio_pg
    clipped = -adv * torch.clamp(ratio_pg, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    loss = aggregate(per_token, m, aggregation)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(dt), m),
            "dual_clip_fraction": masked_mean(dual_active.to(dt), m),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_min": _masked_extreme(ratio, m, largest=False),
            "ratio_max": _masked_extreme(ratio, m, largest=True),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip: float | None = None,
    aggregation: str = "token-mean",
):
    """Clipped value loss: with v_c = old + clip(v − old, −c, c),

        ℓ = ½·max((v − R)², (v_c − R)²)      (ℓ = ½·(v − R)² when ``clip`` is None)

    Returns ``(aggregate(ℓ), stats)`` with ``value_clip_fraction``, ``explained_variance``
    (1 − Var(R − v)/Var(R) over counted tokens; 0 when Var(R) = 0), ``value_mean``, ``return_mean``.
    Gradient flows to ``values`` only.
    """
    dt = acc_dtype(values, old_values, returns)
    m = _mask_for(values.to(dt), mask)
    v, old, ret = (zero_outside(x.to(dt), m) for x in (values, old_values, returns))
    err = (v - ret) ** 2
    if clip is None:
        per_token = 0.5 * err
        clip_active = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        err_clipped = (v_clipped - ret) ** 2
        per_token = 0.5 * torch.maximum(err, err_clipped)
        # v_c differs from v only where |v − old| > clip (old + (v − old) may round differently from v)
        clip_active = (err_clipped > err) & ((v - old).abs() > clip)
    loss = aggregate(per_token, m, aggregation)
    with torch.no_grad():
        var_r = masked_var(ret, m)
        ev = 1.0 - masked_var(ret - v, m) / var_r.clamp_min(torch.finfo(dt).tiny)
        stats = {
            "value_clip_fraction": masked_mean(clip_active.to(dt), m),
            "explained_variance": torch.where(var_r > 0, ev, torch.zeros_like(ev)),
            "value_mean": masked_mean(v, m),
            "return_mean": masked_mean(ret, m),
        }
    return loss, stats


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    log_ratio_clamp: float | None = None,
):
    """The full PPO policy loss from hidden states ``[B, T, H]`` and the LM head ``[V, H]``:

        logp, H = linear_token_logprobs(hidden, weight, targets)
        loss    = clipped_surrogate(logp, old, A) + kl_coef·agg(kl_penalty(logp, ref)) − entropy_coef·agg(H)

    The counted tokens are ``mask`` (default all) and not ``targets == ignore_index``; the per-token inputs
    are selected by them (0 elsewhere). ``log_ratio_clamp`` as in :func:`clipped_surrogate`.
    Stats: those of :func:`clipped_surrogate` plus ``pg_loss``, ``entropy`` and ``kl`` (masked means;
    ``kl`` is 0 without ``ref_logprobs``). This composition is the ground truth of the fused op.
    """
    logp, entropy = linear_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    # any float64 input makes every result float64 (the loss and every stat, whatever kl_coef and entropy_coef)
    dt = acc_dtype(logp, old_logprobs, advantages, ref_logprobs)
    logp, entropy = logp.to(dt), entropy.to(dt)
    m = (targets != ignore_index).to(logp.dtype)
    if mask is not None:
        m = m * mask.to(logp.dtype)
    pg_loss, stats = clipped_surrogate(
        logp, old_logprobs, advantages, m,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation,
        log_ratio_clamp=log_ratio_clamp,
    )
    loss = pg_loss
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(entropy, m, aggregation)
    kl_mean = logp.new_zeros(())
    if ref_logprobs is not None:
        kl = kl_penalty(zero_outside(logp, m), zero_outside(ref_logprobs, m), kl_estimator)  # d = 0 outside
        if kl_coef:
            loss = loss + kl_coef * aggregate(kl, m, aggregation)
        kl_mean = masked_mean(kl.detach(), m)
    stats = dict(stats, pg_loss=pg_loss.detach(), entropy=masked_mean(entropy.detach(), m), kl=kl_mean)
    return loss, stats

"""PPO objectives: clipped policy surrogate and clipped value loss (their aggregation:
:mod:`signalrl.reference.aggregate`; the composition of the fused ``linear_ppo_loss``: :mod:`signalrl.reference.linear_ppo`).

All per-token arrays are ``[B, T]`` (a 1-D ``[N]`` input is treated as one row) with ``mask``
1 where a token counts. Statistics are returned as 0-d tensors (no host sync).

Masks *select*: every per-token input is replaced by 0 outside the mask (``torch.where``, never a
product with the mask, since NaN·0 = NaN), so whatever a masked position holds (NaN, ±inf, 1e30), the
loss, the statistics and the gradients equal those computed with zeros there, and the gradient at a
masked position is exactly 0.
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype
from .aggregate import AGGREGATIONS, _mask_for, aggregate
from .stat_keys import SURROGATE_STAT_KEYS, VALUE_STAT_KEYS
from .stats import masked_mean, masked_var, zero_outside

__all__ = ["AGGREGATIONS", "aggregate", "clipped_surrogate", "value_loss"]

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
        stats = dict(zip(SURROGATE_STAT_KEYS, (
            masked_mean((clipped > unclipped).to(dt), m),        # clip_fraction
            masked_mean(dual_active.to(dt), m),                  # dual_clip_fraction
            masked_mean(ratio - 1.0 - log_ratio, m),             # approx_kl
            masked_mean(ratio, m),                               # ratio_mean
            _masked_extreme(ratio, m, largest=False),            # ratio_min
            _masked_extreme(ratio, m, largest=True),             # ratio_max
        )))
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
        stats = dict(zip(VALUE_STAT_KEYS, (
            masked_mean(clip_active.to(dt), m),                  # value_clip_fraction
            torch.where(var_r > 0, ev, torch.zeros_like(ev)),    # explained_variance
            masked_mean(v, m),                                   # value_mean
            masked_mean(ret, m),                                 # return_mean
        )))
    return loss, stats


def __getattr__(name: str):
    # linear_ppo_loss lived here; it is in signalrl.reference.linear_ppo now (which imports this module)
    if name == "linear_ppo_loss":
        from .linear_ppo import linear_ppo_loss

        return linear_ppo_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The reference composition of the fused ``linear_ppo_loss`` (:mod:`signalrl.ops.linear_ppo`): log-probs and
entropy from hidden states, then the clipped surrogate, the KL penalty and the entropy bonus, aggregated.
Masks select, as in :mod:`signalrl.reference.ppo`.
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype
from .aggregate import aggregate
from .kl import kl_penalty
from .linear_logprobs import linear_token_logprobs
from .ppo import clipped_surrogate
from .stats import masked_mean, zero_outside


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

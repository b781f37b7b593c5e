"""Pieces several losses share: masks, selection, sequence log-probs, aggregation weights and the clipped
policy objective (fused ``linear_ppo_loss`` when it exists and the model allows it, else the composed ops).

Mask semantics: a position counts where its mask is nonzero. Every value at a position that does not count
(masked, or outside the sequence) is *selected* away (``torch.where``), never multiplied by 0, so whatever
such a slot holds — NaN, ±inf, 1e30 — the loss, the metrics and the gradients are those of a 0 there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..ops import AGGREGATIONS, KL_ESTIMATORS, token_weights
from .base import Check, boolean, integer, model_or_none, number, one_of
from .model import IGNORE_INDEX, PolicyModel, predicted_mask

LOG_RATIO_CLAMP = 20.0  # verl's bound on log ρ before exp (token-level ratios: PPO, GRPO)

# Checks for keywords that several losses share.
COMMON_CHECKS: dict[str, Check] = {
    "gamma": number(0.0, 1.0),
    "gae_lambda": number(0.0, 1.0),
    "clip_epsilon": number(0.0, 1.0, lo_open=True, hi_open=True),
    "clip_epsilon_high": number(0.0, lo_open=True, optional=True),
    "dual_clip": number(1.0, lo_open=True, optional=True),
    "log_ratio_clamp": number(0.0, lo_open=True, optional=True),
    "value_clip_epsilon": number(0.0, lo_open=True),
    "value_loss_coef": number(0.0),
    "entropy_coef": number(),
    "beta": number(0.0),
    "use_gae": boolean(),
    "clip_value_loss": boolean(),
    "normalize_advantages": boolean(),
    "scale_rewards": boolean(),
    "advantage_epsilon": number(0.0),
    "max_completion_length": integer(1, optional=True),
    "reference_model": model_or_none(),
    "kl_estimator": one_of(*KL_ESTIMATORS),
    "loss_aggregation": one_of(*AGGREGATIONS),
    "temperature": number(0.0, lo_open=True),
    "label_smoothing": number(0.0, 0.5),
    "clip_ratio": number(1.0),
    "margin": number(),
    "conservative_coef": number(0.0),
    "max_kl_divergence": number(0.0),
}


def select(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is nonzero, else 0 — a selection, not a product: NaN/inf in a slot that does not
    count never reaches a sum or a gradient (the gradient there is exactly 0)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Σ x·m over counted positions (``dim`` None: all), with x selected first (fractional m weight)."""
    prod = select(x, mask) * mask.to(x.dtype)
    return prod.sum() if dim is None else prod.sum(dim)


def batch_float(batch: dict[str, Tensor], key: str, dtype: torch.dtype, mask: Tensor | None = None) -> Tensor:
    """``batch[key]`` read in the loss's compute dtype, selected to 0 where ``mask`` is 0 (if given)."""
    x = batch[key].to(dtype)
    return x if mask is None else select(x, mask)


def response_mask(batch: dict[str, Tensor], key: str = "response_mask", dtype: torch.dtype = torch.float32) -> Tensor:
    """The action tokens ``[B, T]`` (``dtype``): ``batch[key]`` if given, always restricted to tokens that are
    predicted from a real context (:func:`predicted_mask`); what ``batch[key]`` holds outside them is ignored."""
    pm = predicted_mask(batch["attention_mask"], dtype)
    given = batch.get(key)
    return pm if given is None else select(given.to(dtype), pm)


def masked_std(x: Tensor, mask: Tensor) -> Tensor:
    """Bessel-corrected standard deviation over counted elements (0 with fewer than two)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = masked_sum(x, m) / n.clamp_min(1.0)
    var = masked_sum((x - mean) ** 2, m) / (n - 1.0).clamp_min(1.0)
    return var.sqrt()


def sequence_logprob(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Σ_t logprobs·mask over the response tokens ``[B]`` (positions with mask 0 selected away)."""
    return masked_sum(logprobs, mask, -1)


def norm_scale(mask: Tensor, aggregation: str, norm_constant: float | None) -> float:
    """The factor that turns an op's ``seq-mean-token-sum-norm`` (denominator: the number of positions of
    ``mask``) into one over ``norm_constant``; 1.0 for every other aggregation or without a constant.
    A Python float from shapes only (no host sync)."""
    if aggregation != "seq-mean-token-sum-norm" or norm_constant is None:
        return 1.0
    return mask.numel() / float(norm_constant)


def _fused_ppo_op():
    try:
        return ops.linear_ppo_loss
    except (AttributeError, ImportError):  # a build of the op layer without the fused PPO op
        return None


@dataclass
class PolicyTerms:
    loss: Tensor  # surrogate + kl_coef·agg(KL) − entropy_coef·agg(H)
    policy_loss: Tensor  # the clipped surrogate alone (detached)
    entropy: Tensor  # masked mean (detached)
    kl: Tensor  # masked mean of the KL estimate (with grad when composed, else detached)
    approx_kl: Tensor
    clip_fraction: Tensor
    fused: bool


def policy_objective(
    policy: PolicyModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    clip_low: float,
    clip_high: float | None,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    aggregation: str,
    temperature: float,
    log_ratio_clamp: float | None = None,
    norm_constant: float | None = None,
    hidden: Tensor | None = None,
    need_kl_grad: bool = False,
    allow_fused: bool = True,
) -> PolicyTerms:
    """The PPO/GRPO policy part over the action tokens ``mask`` ``[B, T]``:

        ℓ = clipped_surrogate(logπ, logπ_old, A) + kl_coef·agg(KL(logπ, logπ_ref)) − entropy_coef·agg(H)

    ``old_logprobs`` None means the current policy, detached (ratio 1). ``advantages``, ``old_logprobs`` and
    ``ref_logprobs`` are selected to 0 where ``mask`` is 0 (as are the log-probs), so masked slots may hold
    anything. ``log_ratio_clamp`` c bounds log ρ to [−c, c] before the exp (None: no bound).
    ``norm_constant`` replaces B·(T − 1) as the denominator of ``seq-mean-token-sum-norm`` (Dr. GRPO's
    constant). ``hidden`` (``[B, T, H]``) can be passed when the caller already ran the backbone (e.g. for
    the value head). Uses the fused ``ops.linear_ppo_loss`` when it exists, the model allows the fused
    path, and the KL is not needed with its own gradient (``need_kl_grad``).
    """
    advantages = select(advantages, mask)
    old_logprobs = None if old_logprobs is None else select(old_logprobs, mask)
    ref_logprobs = None if ref_logprobs is None else select(ref_logprobs, mask)
    p = slice(1, None)  # aggregate over the T − 1 predicted positions (fused and composed alike)
    # Dr. GRPO's constant: the ops divide seq-mean-token-sum-norm by the number of positions; rescale.
    scale = norm_scale(mask[:, p], aggregation, norm_constant)

    fused_op = _fused_ppo_op() if (allow_fused and not need_kl_grad) else None
    if fused_op is not None and policy._fused():
        if hidden is None:
            hidden = policy.hidden_states(input_ids, attention_mask)
        weight, bias = policy.lm_head()
        # targets of masked positions are ignored: their log-prob is 0, like the selected old/ref there
        targets = torch.where(mask[:, p] != 0, input_ids[:, p], torch.full_like(input_ids[:, p], IGNORE_INDEX))
        h = hidden[:, :-1]
        if old_logprobs is None:
            with torch.no_grad():
                old = ops.linear_token_logprobs(
                    h.detach(), weight.detach(), targets, bias=None if bias is None else bias.detach(),
                    temperature=temperature, ignore_index=IGNORE_INDEX,
                )
        else:
            old = old_logprobs[:, p]
        loss, stats = fused_op(
            h, weight, targets, old, advantages[:, p], mask[:, p],
            bias=bias, ref_logprobs=None if ref_logprobs is None else ref_logprobs[:, p],
            temperature=temperature, ignore_index=IGNORE_INDEX, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
            aggregation=aggregation, log_ratio_clamp=log_ratio_clamp,
        )
        pg = stats["pg_loss"].detach()
        if scale != 1.0:
            loss, pg = loss * scale, pg * scale
        return PolicyTerms(
            loss=loss, policy_loss=pg, entropy=stats["entropy"], kl=stats["kl"],
            approx_kl=stats["approx_kl"], clip_fraction=stats["clip_fraction"], fused=True,
        )

    out = policy.forward(input_ids, attention_mask, with_entropy=True, temperature=temperature, hidden=hidden)
    lp = select(out.logprobs, mask)  # prompt tokens have real log-probs; they do not count
    old = lp.detach() if old_logprobs is None else old_logprobs
    pg, stats = ops.clipped_surrogate(
        lp[:, p], old[:, p], advantages[:, p], mask[:, p], clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, aggregation=aggregation, log_ratio_clamp=log_ratio_clamp,
    )
    if scale != 1.0:
        pg = pg * scale
    loss = pg
    if entropy_coef:
        loss = loss - entropy_coef * _aggregate(out.entropy, mask, aggregation, norm_constant)
    if ref_logprobs is not None:
        kl_tok = ops.kl_penalty(lp, ref_logprobs, kl_estimator)  # 0 where masked: both sides are 0 there
        if kl_coef:
            loss = loss + kl_coef * _aggregate(kl_tok, mask, aggregation, norm_constant)
        kl = ops.masked_mean(select(kl_tok, mask), mask)
    else:
        kl = lp.new_zeros(())
    return PolicyTerms(
        loss=loss, policy_loss=pg.detach(), entropy=ops.masked_mean(select(out.entropy.detach(), mask), mask),
        kl=kl if need_kl_grad else kl.detach(), approx_kl=stats["approx_kl"], clip_fraction=stats["clip_fraction"],
        fused=False,
    )


def _aggregate(x: Tensor, mask: Tensor, aggregation: str, norm_constant: float | None = None) -> Tensor:
    """Σ w·x over the T − 1 predicted positions (1..T−1) of ``[B, T]`` arrays, with the aggregation's token
    weights (:func:`signalrl.ops.token_weights` in x's dtype, ``norm_constant`` replacing B·T as the denominator of
    ``seq-mean-token-sum-norm`` when given); x is selected to 0 where the mask is 0."""
    m = mask[:, 1:]
    return (token_weights(m, aggregation, dtype=x.dtype, norm_constant=norm_constant) * select(x[:, 1:], m)).sum()

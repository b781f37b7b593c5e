"""Pieces several losses share: masks, sequence log-probs, and the clipped policy objective
(fused ``linear_ppo_loss`` when it exists and the model allows it, else the composed ops)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from .base import Check, boolean, model_or_none, number, one_of
from .model import IGNORE_INDEX, PolicyModel, predicted_mask



AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")

# Checks for keywords that several losses share.
COMMON_CHECKS: dict[str, Check] = {
    "gamma": number(0.0, 1.0),
    "gae_lambda": number(0.0, 1.0),
    "clip_epsilon": number(0.0, 1.0, lo_open=True, hi_open=True),
    "clip_epsilon_high": number(0.0, lo_open=True, optional=True),
    "dual_clip": number(1.0, lo_open=True, optional=True),
    "value_clip_epsilon": number(0.0, lo_open=True),
    "value_loss_coef": number(0.0),
    "entropy_coef": number(),
    "beta": number(0.0),
    "use_gae": boolean(),
    "clip_value_loss": boolean(),
    "normalize_advantages": boolean(),
    "scale_rewards": boolean(),
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


def response_mask(batch: dict[str, Tensor], key: str = "response_mask") -> Tensor:
    """The action tokens ``[B, T]`` float32: ``batch[key]`` if given, always restricted to tokens that
    are predicted from a real context (:func:`predicted_mask`)."""
    pm = predicted_mask(batch["attention_mask"])
    given = batch.get(key)
    return pm if given is None else pm * given.to(torch.float32)


def masked_std(x: Tensor, mask: Tensor) -> Tensor:
    """Bessel-corrected standard deviation over counted elements (0 with fewer than two)."""
    m = mask.to(torch.float32)
    n = m.sum()
    mean = (x * m).sum() / n.clamp_min(1.0)
    var = (((x - mean) ** 2) * m).sum() / (n - 1.0).clamp_min(1.0)
    return var.sqrt()


def sequence_logprob(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Σ_t logprobs·mask over the response tokens ``[B]``."""
    return (logprobs * mask).sum(-1)


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
    hidden: Tensor | None = None,
    need_kl_grad: bool = False,
    allow_fused: bool = True,
) -> PolicyTerms:
    """The PPO/GRPO policy part over the action tokens ``mask`` ``[B, T]``:

        ℓ = clipped_surrogate(logπ, logπ_old, A) + kl_coef·agg(KL(logπ, logπ_ref)) − entropy_coef·agg(H)

    ``old_logprobs`` None means the current policy, detached (ratio 1). ``hidden`` (``[B, T, H]``) can be
    passed when the caller already ran the backbone (e.g. for the value head). Uses the fused
    ``ops.linear_ppo_loss`` when it exists, the model allows the fused path, and the KL is not needed
    with its own gradient (``need_kl_grad``).
    """
    fused_op = _fused_ppo_op() if (allow_fused and not need_kl_grad) else None
    if fused_op is not None and policy._fused():
        if hidden is None:
            hidden = policy.hidden_states(input_ids, attention_mask)
        weight, bias = policy.lm_head()
        targets = torch.where(mask[:, 1:] > 0, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
        h = hidden[:, :-1]
        if old_logprobs is None:
            with torch.no_grad():
                old = ops.linear_token_logprobs(
                    h.detach(), weight.detach(), targets, bias=None if bias is None else bias.detach(),
                    temperature=temperature, ignore_index=IGNORE_INDEX,
                )
        else:
            old = old_logprobs[:, 1:]
        loss, stats = fused_op(
            h, weight, targets, old, advantages[:, 1:], mask[:, 1:],
            bias=bias, ref_logprobs=None if ref_logprobs is None else ref_logprobs[:, 1:],
            temperature=temperature, ignore_index=IGNORE_INDEX, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
            aggregation=aggregation,
        )
        return PolicyTerms(
            loss=loss, policy_loss=stats["pg_loss"].detach(), entropy=stats["entropy"], kl=stats["kl"],
            approx_kl=stats["approx_kl"], clip_fraction=stats["clip_fraction"], fused=True,
        )

    out = policy.forward(input_ids, attention_mask, with_entropy=True, temperature=temperature, hidden=hidden)
    lp = out.logprobs
    old = lp.detach() if old_logprobs is None else old_logprobs
    p = slice(1, None)  # aggregate over the T − 1 predicted positions, exactly as the fused op does
    pg, stats = ops.clipped_surrogate(
        lp[:, p], old[:, p], advantages[:, p], mask[:, p], clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation
    )
    loss = pg
    if entropy_coef:
        loss = loss - entropy_coef * _aggregate(out.entropy, mask, aggregation)
    if ref_logprobs is not None:
        kl_tok = ops.kl_penalty(lp, ref_logprobs, kl_estimator)
        if kl_coef:
            loss = loss + kl_coef * _aggregate(kl_tok, mask, aggregation)
        kl = ops.masked_mean(kl_tok, mask)
    else:
        kl = lp.new_zeros(())
    return PolicyTerms(
        loss=loss, policy_loss=pg.detach(), entropy=ops.masked_mean(out.entropy.detach(), mask),
        kl=kl if need_kl_grad else kl.detach(), approx_kl=stats["approx_kl"], clip_fraction=stats["clip_fraction"],
        fused=False,
    )


def _aggregate(x: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    """Σ w·x over the T − 1 predicted positions (1..T−1) of ``[B, T]`` arrays, with the
    aggregation's token weights (:func:`signalrl.ops.token_weights`)."""
    return (ops.token_weights(mask[:, 1:], aggregation) * x[:, 1:]).sum()

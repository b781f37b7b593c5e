"""``enhanced_ppo`` and ``conservative_ppo``.

enhanced_ppo:
    A, R   = GAE(rewards, values; γ, λ) over the action tokens (λ = 1 when use_gae=False, which is
             exactly discounted returns − values); A whitened over the batch if normalize_advantages
    loss   = clipped_surrogate(logπ, logπ_old, A) + value_loss_coef·value_loss(V, V_old, R)
             − entropy_coef·H + beta·KL(π‖π_ref)
conservative_ppo:
    loss   = the same with the defaults value_loss_coef = entropy_coef = beta = 0 (the policy part),
             + conservative_coef·max(0, KL − max_kl_divergence)²,  KL = kl_divergence (masked mean)

Per-token arrays are ``[B, T]`` aligned with input_ids: token t is an action when response_mask[t]
(default: attention_mask shifted to the predicted tokens); old_log_probs[t], rewards[t], values[t]
belong to that action. H, KL and the surrogate are aggregated with ``loss_aggregation``; the ratio
ρ = exp(clamp(logπ − logπ_old, ±log_ratio_clamp)) (20 by default, verl's bound; None: unbounded).
Whatever a slot that is not an action holds (NaN, inf) is selected away: it changes nothing.
"""
from __future__ import annotations

import torch

from .. import ops
from ._common import (
    COMMON_CHECKS, LOG_RATIO_CLAMP, batch_float, masked_std, masked_sum, policy_objective, response_mask, select,
)
from .base import Computed, Field, LossModule, LossSpec
from .registry import register_loss

# --- batch spec ------------------------------------------------------------------------------

BATCH = (
    Field("input_ids", ("B", "T"), "int", doc="prompt + response tokens"),
    Field("attention_mask", ("B", "T"), "mask", doc="1 = real token"),
    Field("old_log_probs", ("B", "T"), "float", doc="log-probs of the rollout policy, aligned with input_ids"),
    Field("rewards", ("B", "T"), "float", doc="per-token rewards (e.g. the sequence reward on the last token)"),
    Field("values", ("B", "T"), "float", required=False, doc="rollout values V(input_ids[<t]); default: the value head"),
    Field("old_values", ("B", "T"), "float", required=False, doc="values for value clipping; default: values"),
    Field("response_mask", ("B", "T"), "mask", required=False, doc="1 = action token; default: predicted tokens"),
    Field("ref_log_probs", ("B", "T"), "float", required=False, doc="precomputed reference log-probs (skips the reference pass)"),
)

# --- defaults --------------------------------------------------------------------------------

ENHANCED_DEFAULTS = dict(
    use_gae=True,
    gamma=0.99,
    gae_lambda=0.95,
    clip_epsilon=0.2,
    clip_epsilon_high=None,
    dual_clip=None,
    log_ratio_clamp=LOG_RATIO_CLAMP,
    value_loss_coef=0.5,
    entropy_coef=0.01,
    beta=0.01,
    clip_value_loss=True,
    value_clip_epsilon=0.2,
    reference_model=None,
    normalize_advantages=True,
    kl_estimator="k3",
    loss_aggregation="token-mean",
    temperature=1.0,
)

CONSERVATIVE_DEFAULTS = dict(
    ENHANCED_DEFAULTS,
    value_loss_coef=0.0,
    entropy_coef=0.0,
    beta=0.0,
    conservative_coef=0.1,
    max_kl_divergence=0.01,
)

PPO_METRICS = (
    "policy_loss", "value_loss", "entropy", "kl_divergence", "approx_kl", "clip_fraction", "advantage_mean",
    "advantage_std", "explained_variance", "value_mean", "return_mean", "reward_mean", "loss",
)
CONSERVATIVE_METRICS = PPO_METRICS[:-1] + ("kl_violation", "kl_penalty", "max_kl_threshold", "loss")

# --- math ------------------------------------------------------------------------------------


def _ppo(policy, batch, kw, *, conservative: bool) -> Computed:
    name = "conservative_ppo" if conservative else "enhanced_ppo"
    ids, attn = batch["input_ids"], batch["attention_mask"]
    dt = policy.compute_dtype  # float32, or float64 for a float64 model
    mask = response_mask(batch, dtype=dt)
    # Every per-token batch array is selected to 0 where it does not count: masked slots may hold anything.
    rewards = batch_float(batch, "rewards", dt, mask)

    # Values: the value head (one backbone pass shared with the policy), else the batch's values
    # (a constant: no value training), else — conservative_ppo only — a zero baseline.
    hidden, value_fn = None, True
    if policy.value_head is not None:
        hidden = policy.hidden_states(ids, attn)
        values = select(policy.values_from_hidden(hidden).to(dt), mask)
    elif "values" in batch:
        values = batch_float(batch, "values", dt, mask)
    elif conservative:
        values, value_fn = torch.zeros_like(rewards), False
    else:
        raise ValueError(
            f"{name}: no values: give batch['values'] or a value head (PolicyModel(model, value_head=ValueHead(H)))"
        )
    rollout_values = batch_float(batch, "values", dt, mask) if "values" in batch else values.detach()
    old_values = batch_float(batch, "old_values", dt, mask) if "old_values" in batch else rollout_values

    with torch.no_grad():
        lam = kw["gae_lambda"] if kw["use_gae"] else 1.0
        advantages, returns = ops.gae(rewards, rollout_values, mask, gamma=kw["gamma"], lam=lam)
        advantages, returns = select(advantages, mask), select(returns, mask)
        adv_mean, adv_std = ops.masked_mean(advantages, mask), masked_std(advantages, mask)
        if kw["normalize_advantages"]:
            advantages = select(ops.masked_whiten(advantages, mask), mask)

    need_ref = conservative or kw["beta"] > 0
    ref = None
    if need_ref and "ref_log_probs" in batch:
        ref = batch_float(batch, "ref_log_probs", dt, mask)
    elif need_ref:
        ref = policy.reference_logprobs(ids, attn, reference_model=kw["reference_model"], temperature=kw["temperature"])
        ref = select(ref.to(dt), mask)

    terms = policy_objective(
        policy, ids, attn, mask, advantages,
        old_logprobs=batch_float(batch, "old_log_probs", dt, mask), ref_logprobs=ref,
        clip_low=kw["clip_epsilon"], clip_high=kw["clip_epsilon_high"], dual_clip=kw["dual_clip"],
        kl_coef=kw["beta"], kl_estimator=kw["kl_estimator"], entropy_coef=kw["entropy_coef"],
        aggregation=kw["loss_aggregation"], temperature=kw["temperature"], log_ratio_clamp=kw["log_ratio_clamp"],
        hidden=hidden, need_kl_grad=conservative,
    )
    p = slice(1, None)  # the T − 1 predicted positions, as in the policy part
    v_loss, v_stats = ops.value_loss(
        values[:, p], old_values[:, p], returns[:, p], mask[:, p],
        clip=kw["value_clip_epsilon"] if kw["clip_value_loss"] else None, aggregation=kw["loss_aggregation"],
    )
    loss = terms.loss
    if kw["value_loss_coef"]:
        loss = loss + kw["value_loss_coef"] * v_loss

    metrics = {
        "policy_loss": terms.policy_loss,
        "value_loss": v_loss.detach(),
        "entropy": terms.entropy,
        "kl_divergence": terms.kl.detach(),
        "approx_kl": terms.approx_kl,
        "clip_fraction": terms.clip_fraction,
        "advantage_mean": adv_mean,
        "advantage_std": adv_std,
        "explained_variance": v_stats["explained_variance"],
        "value_mean": v_stats["value_mean"],
        "return_mean": v_stats["return_mean"],
        "reward_mean": masked_sum(rewards, mask, -1).mean(),
        # anything (nonzero, NaN, inf) in a reward slot that does not count: a note, never a number
        "_rewards_outside_mask": ((batch["rewards"] != 0) & (mask == 0)).any().float(),
    }
    if conservative:
        excess = torch.relu(terms.kl - kw["max_kl_divergence"])
        penalty = kw["conservative_coef"] * excess * excess
        loss = loss + penalty
        metrics.update(
            kl_violation=(terms.kl.detach() > kw["max_kl_divergence"]).float(),
            kl_penalty=penalty.detach(),
            max_kl_threshold=float(kw["max_kl_divergence"]),
        )
    skip = set()
    if not value_fn:
        skip.add("explained_variance")
    if ref is None:
        skip.add("kl_divergence")
    return Computed(
        loss=loss, metrics=metrics, skip_monitors=frozenset(skip),
        notes_if={"_rewards_outside_mask": "rewards outside the response mask are ignored (GAE runs over action tokens only)."},
    )


def _enhanced(policy, batch, kw):
    return _ppo(policy, batch, kw, conservative=False)


def _conservative(policy, batch, kw):
    return _ppo(policy, batch, kw, conservative=True)


# --- specs and drop-in forms -----------------------------------------------------------------

enhanced_ppo = register_loss(LossSpec(
    name="enhanced_ppo",
    batch=BATCH,
    defaults=ENHANCED_DEFAULTS,
    checks=COMMON_CHECKS,
    compute=_enhanced,
    needs_value_head=True,
    uses_reference=True,
    metric_names=PPO_METRICS,
    summary="PPO with GAE: clipped surrogate + value_loss_coef·value loss − entropy_coef·entropy + beta·KL",
))

conservative_ppo = register_loss(LossSpec(
    name="conservative_ppo",
    batch=BATCH,
    defaults=CONSERVATIVE_DEFAULTS,
    checks=COMMON_CHECKS,
    compute=_conservative,
    uses_reference=True,
    metric_names=CONSERVATIVE_METRICS,
    summary="PPO policy part + conservative_coef·max(0, KL − max_kl_divergence)²",
))


class EnhancedPPOLoss(LossModule):
    """``EnhancedPPOLoss(value_head=ValueHead(H), **kwargs)(model, batch) -> LossResult``."""

    spec = enhanced_ppo


class ConservativePPOLoss(LossModule):
    """``ConservativePPOLoss(**kwargs)(model, batch) -> LossResult``."""

    spec = conservative_ppo

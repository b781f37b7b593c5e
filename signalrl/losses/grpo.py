"""``grpo``: group relative policy optimization.

    A_{b,s}   = (r_{b,s} − mean_s r_{b,·}) / (std_s r_{b,·} + advantage_epsilon)   (unbiased std, ε = 1e-6;
                scale_rewards=False: r − mean, the Dr. GRPO variant); a group of one sample has A = 0;
                broadcast to every response token of sample s
    loss      = clipped_surrogate(logπ, logπ_old, A) + beta·KL(π‖π_ref)     over response tokens
                (ρ = exp(clamp(log ρ, ±log_ratio_clamp)), 20 by default)

Each of the B prompts (left-padded, ``prompt_attention_mask``) is followed by each of its S responses
(``response_masks`` 1 = a counted response token; padding after the response). Per-token arrays
``[B, S, L]`` are aligned with ``response_ids``: entry l is log p(response[l] | prompt, response[<l]).
Without ``old_log_probs`` the old policy is the current one, detached (ratio 1: the plain policy gradient).
``seq-mean-token-sum-norm`` (Dr. GRPO) divides by B·S·max_completion_length (default L, the response
width), a constant that prompt padding does not change. Slots of ``old_log_probs`` / ``ref_log_probs``
whose response mask is 0 may hold anything (NaN, inf): they are selected away.
"""
from __future__ import annotations

import torch

from .. import ops
from ._common import COMMON_CHECKS, LOG_RATIO_CLAMP, masked_std, policy_objective, select
from .base import Computed, Field, LossModule, LossSpec
from .model import IGNORE_INDEX
from .registry import register_loss

# --- batch spec ------------------------------------------------------------------------------

BATCH = (
    Field("prompt_ids", ("B", "P"), "int", doc="left-padded prompts"),
    Field("response_ids", ("B", "S", "L"), "int", doc="S sampled responses per prompt"),
    Field("rewards", ("B", "S"), "float", doc="one scalar reward per response"),
    Field("response_masks", ("B", "S", "L"), "mask", doc="1 = response token that counts"),
    Field("old_log_probs", ("B", "S", "L"), "float", required=False, doc="sampling-time log-probs"),
    Field("prompt_attention_mask", ("B", "P"), "mask", required=False, doc="1 = real prompt token; default all 1"),
    Field("ref_log_probs", ("B", "S", "L"), "float", required=False, doc="precomputed reference log-probs"),
)

# --- defaults --------------------------------------------------------------------------------

DEFAULTS = dict(
    beta=0.01,
    clip_epsilon=0.2,
    clip_epsilon_high=None,
    log_ratio_clamp=LOG_RATIO_CLAMP,
    reference_model=None,
    scale_rewards=True,
    advantage_epsilon=1e-6,
    max_completion_length=None,
    kl_estimator="k3",
    loss_aggregation="token-mean",
    temperature=1.0,
)
METRICS = (
    "policy_loss", "kl_divergence", "clip_fraction", "entropy", "reward_mean", "reward_std", "advantage_mean",
    "advantage_std", "loss",
)

# --- math ------------------------------------------------------------------------------------


def group_sequences(batch, dtype: torch.dtype = torch.float32):
    """The B·S sequences prompt ‖ response: ids, attention ``[B·S, P+L]`` and the response-token mask.

    Attention covers the prompt's real tokens and every response position up to the last counted
    one (a masked span inside a response, e.g. tool output, stays visible as context)."""
    prompt, resp, rmask = batch["prompt_ids"], batch["response_ids"], batch["response_masks"].to(dtype)
    B, S, L = resp.shape
    P = prompt.shape[1]
    pmask = batch.get("prompt_attention_mask")
    pmask = torch.ones_like(prompt, dtype=torch.bool) if pmask is None else pmask != 0
    if P and bool((~pmask[:, -1]).any()):
        raise ValueError("grpo: prompts must be left-padded (prompt_attention_mask[:, -1] must be all 1)")
    counted = rmask != 0
    visible = counted.flip(-1).cummax(-1).values.flip(-1)  # up to the last counted token
    ids = torch.cat([prompt.unsqueeze(1).expand(B, S, P), resp], dim=-1).reshape(B * S, P + L)
    attn = torch.cat([pmask.unsqueeze(1).expand(B, S, P), visible], dim=-1).reshape(B * S, P + L)
    mask = torch.cat([rmask.new_zeros(B, S, P), rmask], dim=-1).reshape(B * S, P + L)
    mask = select(mask, attn)
    if P == 0:
        mask[:, 0] = 0.0  # the first token of a prompt-less sequence is not predicted
    return ids, attn.long(), mask, P


def _to_sequences(x, P):
    """Per-response-token ``[B, S, L]`` → ``[B·S, P + L]`` aligned with the sequences (0 on the prompt)."""
    B, S, L = x.shape
    return torch.cat([x.new_zeros(B, S, P), x], dim=-1).reshape(B * S, P + L)


def _grpo(policy, batch, kw) -> Computed:
    B, S, L = batch["response_ids"].shape
    dt = policy.compute_dtype  # float32, or float64 for a float64 model
    ids, attn, mask, P = group_sequences(batch, dt)
    rewards = batch["rewards"].to(dt)

    with torch.no_grad():
        adv_seq = ops.group_normalize(rewards, eps=kw["advantage_epsilon"], scale=kw["scale_rewards"])  # [B, S]
        advantages = select(adv_seq.reshape(B * S, 1).expand(B * S, P + L), mask)
        old = batch.get("old_log_probs")
        if old is not None:
            old = select(_to_sequences(old.to(dt), P), mask)

    labels = torch.where(mask != 0, ids, torch.full_like(ids, IGNORE_INDEX))
    ref = None
    if kw["beta"] > 0 and "ref_log_probs" in batch:
        ref = select(_to_sequences(batch["ref_log_probs"].to(dt), P), mask)
    elif kw["beta"] > 0:
        ref = policy.reference_logprobs(
            ids, attn, reference_model=kw["reference_model"], temperature=kw["temperature"], labels=labels
        ).to(dt)

    # Dr. GRPO's constant: B·S sequences × the response horizon — never the prompt's (padded) width.
    horizon = kw["max_completion_length"] if kw["max_completion_length"] is not None else L
    terms = policy_objective(
        policy, ids, attn, mask, advantages, old_logprobs=old, ref_logprobs=ref,
        clip_low=kw["clip_epsilon"], clip_high=kw["clip_epsilon_high"], dual_clip=None,
        kl_coef=kw["beta"], kl_estimator=kw["kl_estimator"], entropy_coef=0.0,
        aggregation=kw["loss_aggregation"], temperature=kw["temperature"], log_ratio_clamp=kw["log_ratio_clamp"],
        norm_constant=B * S * horizon,
    )
    std_per_group = rewards.std(-1) if S > 1 else torch.zeros_like(rewards[:, 0])
    metrics = {
        "policy_loss": terms.policy_loss,
        "kl_divergence": terms.kl.detach(),
        "clip_fraction": terms.clip_fraction,
        "entropy": terms.entropy,
        "reward_mean": rewards.mean(),
        "reward_std": std_per_group.mean(),
        "advantage_mean": adv_seq.mean(),
        "advantage_std": masked_std(adv_seq, torch.ones_like(adv_seq)),
    }
    skip = set()
    if old is None:
        skip.add("clip_fraction")  # the ratio is 1 by construction
    if ref is None:
        skip.add("kl_divergence")
    return Computed(loss=terms.loss, metrics=metrics, skip_monitors=frozenset(skip))


# --- spec and drop-in form -------------------------------------------------------------------

grpo = register_loss(LossSpec(
    name="grpo",
    batch=BATCH,
    defaults=DEFAULTS,
    checks=COMMON_CHECKS,
    compute=_grpo,
    uses_reference=True,
    metric_names=METRICS,
    summary="clipped surrogate with group-normalized advantages + beta·KL",
))


class GRPOLoss(LossModule):
    """``GRPOLoss(beta=0.01, reference_model=ref)(model, batch) -> LossResult``."""

    spec = grpo

"""``importance_sampling``: off-policy sequence-level policy gradient with truncated weights.

    logπ(y|x) = Σ over response tokens of log π(y_t | x, y_<t)
    w         = exp(logπ(y|x) − behavior_log_probs),   w̄ = min(w, clip_ratio)
                (computed as exp(min(log w, log clip_ratio)): the gradient flows where w < clip_ratio only)
    A         = advantages if given, else R − mean_B(R), R = rewards ([B], or Σ_t rewards·response_mask for [B, T])
    loss      = −mean_B(w̄·A) + beta·KL,  KL = masked mean over response tokens of the per-token estimate
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ._common import COMMON_CHECKS, response_mask, sequence_logprob
from .base import Computed, Field, LossModule, LossSpec
from .registry import register_loss

# --- batch spec ------------------------------------------------------------------------------

BATCH = (
    Field("input_ids", ("B", "T"), "int"),
    Field("attention_mask", ("B", "T"), "mask"),
    Field("behavior_log_probs", ("B",), "float", doc="sequence log-prob under the behaviour policy"),
    Field("rewards", (("B",), ("B", "T")), "float", doc="sequence rewards [B] or per-token [B, T]"),
    Field("advantages", ("B",), "float", required=False, doc="default: rewards minus their batch mean"),
    Field("response_mask", ("B", "T"), "mask", required=False, doc="1 = response token; default: predicted tokens"),
    Field("ref_log_probs", ("B", "T"), "float", required=False, doc="precomputed reference log-probs"),
)

# --- defaults --------------------------------------------------------------------------------

DEFAULTS = dict(beta=0.1, clip_ratio=10.0, reference_model=None, kl_estimator="k3", temperature=1.0)
METRICS = (
    "is_ratio_mean", "is_ratio_max", "is_ratio_min", "clipped_fraction", "kl_divergence", "policy_loss", "loss",
)

# --- math ------------------------------------------------------------------------------------


def _importance_sampling(policy, batch, kw) -> Computed:
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = response_mask(batch)
    lp = policy.token_logprobs(ids, attn, temperature=kw["temperature"])
    log_w = sequence_logprob(lp, mask) - batch["behavior_log_probs"].float()
    w_clipped = torch.exp(torch.clamp(log_w, max=math.log(kw["clip_ratio"])))

    with torch.no_grad():
        if "advantages" in batch:
            adv = batch["advantages"].float()
        else:
            r = batch["rewards"].float()
            r = (r * mask).sum(-1) if r.dim() == 2 else r
            adv = r - r.mean()
    policy_loss = -(w_clipped * adv).mean()
    loss = policy_loss

    kl = lp.new_zeros(())
    if kw["beta"] > 0:
        ref = batch["ref_log_probs"].float() if "ref_log_probs" in batch else policy.reference_logprobs(
            ids, attn, reference_model=kw["reference_model"], temperature=kw["temperature"])
        kl = ops.masked_mean(ops.kl_penalty(lp, ref, kw["kl_estimator"]), mask)
        loss = loss + kw["beta"] * kl

    with torch.no_grad():
        w = torch.exp(log_w)
        metrics = {
            "is_ratio_mean": w.mean(),
            "is_ratio_max": w.max(),
            "is_ratio_min": w.min(),
            "clipped_fraction": (log_w > math.log(kw["clip_ratio"])).float().mean(),
            "kl_divergence": kl.detach(),
            "policy_loss": policy_loss.detach(),
        }
    return Computed(loss=loss, metrics=metrics, skip_monitors=frozenset() if kw["beta"] > 0 else {"kl_divergence"})


# --- spec and drop-in form -------------------------------------------------------------------

importance_sampling = register_loss(LossSpec(
    name="importance_sampling",
    batch=BATCH,
    defaults=DEFAULTS,
    checks=COMMON_CHECKS,
    compute=_importance_sampling,
    uses_reference=True,
    metric_names=METRICS,
    summary="−mean(min(π/μ, clip_ratio)·A) + beta·KL over sequences",
))


class ImportanceSamplingLoss(LossModule):
    """``ImportanceSamplingLoss(clip_ratio=10.0, reference_model=ref)(model, batch) -> LossResult``."""

    spec = importance_sampling

"""``importance_sampling``: off-policy sequence-level policy gradient with truncated weights.

    logπ(y|x) = Σ over response tokens of log π(y_t | x, y_<t)
    w         = exp(logπ(y|x) − behavior_log_probs),   w̄ = min(w, clip_ratio)
                (computed as exp(min(log w, log clip_ratio)): the gradient flows where w < clip_ratio only;
                with log_ratio_clamp c, log w is first clamped to [−c, c]: None by default, see below)
    A         = advantages if given, else R − mean_B(R), R = rewards ([B], or Σ_t rewards·response_mask for [B, T])
    loss      = −mean_B(w̄·A) + beta·KL,  KL = masked mean over response tokens of the per-token estimate

``log_ratio_clamp`` defaults to None here (20 in the token-level losses): w̄ is already bounded by
clip_ratio, and a sequence log-ratio beyond ±20 is ordinary for long responses, so a clamp would only
distort the ``is_ratio_*`` metrics. Slots of per-token ``rewards`` / ``ref_log_probs`` outside the
response mask may hold anything (NaN, inf): they are selected away.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ._common import COMMON_CHECKS, batch_float, masked_sum, response_mask, select, sequence_logprob
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

DEFAULTS = dict(
    beta=0.1, clip_ratio=10.0, log_ratio_clamp=None, reference_model=None, kl_estimator="k3", temperature=1.0,
)
METRICS = (
    "is_ratio_mean", "is_ratio_max", "is_ratio_min", "clipped_fraction", "kl_divergence", "policy_loss", "loss",
)

# --- math ------------------------------------------------------------------------------------


def _importance_sampling(policy, batch, kw) -> Computed:
    ids, attn = batch["input_ids"], batch["attention_mask"]
    dt = policy.compute_dtype  # float32, or float64 for a float64 model
    mask = response_mask(batch, dtype=dt)
    lp = select(policy.token_logprobs(ids, attn, temperature=kw["temperature"]).to(dt), mask)
    log_w = sequence_logprob(lp, mask) - batch["behavior_log_probs"].to(dt)
    c = kw["log_ratio_clamp"]
    log_w_c = log_w if c is None else torch.clamp(log_w, -c, c)
    w_clipped = torch.exp(torch.clamp(log_w_c, max=math.log(kw["clip_ratio"])))

    with torch.no_grad():
        if "advantages" in batch:
            adv = batch["advantages"].to(dt)
        else:
            r = batch["rewards"].to(dt)
            r = masked_sum(r, mask, -1) if r.dim() == 2 else r
            adv = r - r.mean()
    policy_loss = -(w_clipped * adv).mean()
    loss = policy_loss

    kl = lp.new_zeros(())
    if kw["beta"] > 0:
        if "ref_log_probs" in batch:
            ref = batch_float(batch, "ref_log_probs", dt, mask)
        else:
            ref = policy.reference_logprobs(ids, attn, reference_model=kw["reference_model"], temperature=kw["temperature"])
            ref = select(ref.to(dt), mask)
        kl_tok = ops.kl_penalty(lp, ref, kw["kl_estimator"])  # 0 where masked: both sides are 0 there
        kl = ops.masked_mean(select(kl_tok, mask), mask)
        loss = loss + kw["beta"] * kl

    with torch.no_grad():
        w = torch.exp(log_w_c)
        metrics = {
            "is_ratio_mean": w.mean(),
            "is_ratio_max": w.max(),
            "is_ratio_min": w.min(),
            "clipped_fraction": (log_w > math.log(kw["clip_ratio"])).to(dt).mean(),
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

"""``reward_modeling``: a Bradley–Terry reward model with a margin.

    r_w, r_l  = reward head at the last non-padding token of chosen / rejected
    P(y_w ≻ y_l) = σ((r_w − r_l) / temperature)
    loss      = mean_B[ −log σ((r_w − r_l) / temperature − margin) ]

The margin is subtracted from the logit, after the temperature: the loss keeps pushing until the
chosen reward exceeds the rejected one by margin·temperature (0.1 reward units at the defaults);
margin = 0 is plain Bradley–Terry. At r_w = r_l the loss is log(1 + e^margin).

The head's bias b cancels in r_w − r_l, so its gradient is 0: it enters as a constant
(:meth:`~signalrl.losses.model.RewardHead.constant_bias`) and gets an exactly zero gradient rather than the rounding
noise of Σ ∂L/∂r, which Adam would turn into ±lr steps. Values, loss and metrics are unchanged (b is still in r).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._common import COMMON_CHECKS
from .base import Computed, LossModule, LossSpec
from .dpo import BATCH as DPO_BATCH
from .dpo import pair_batch
from .model import RewardHead
from .registry import register_loss

# --- batch spec ------------------------------------------------------------------------------

BATCH = tuple(f for f in DPO_BATCH if f.key in (
    "chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask"))

# --- defaults --------------------------------------------------------------------------------

DEFAULTS = dict(margin=1.0, temperature=0.1)
METRICS = (
    "preference_accuracy", "reward_margin", "chosen_reward_mean", "rejected_reward_mean", "chosen_reward_std",
    "rejected_reward_std", "loss",
)

# --- math ------------------------------------------------------------------------------------


def _reward_modeling(policy, batch, kw) -> Computed:
    B = batch["chosen_input_ids"].shape[0]
    ids, attn, _ = pair_batch(batch)
    head = getattr(policy, "reward_head", None)
    # the loss depends on r_w − r_l only: the head's bias cancels, its gradient is exactly 0 (not rounding noise)
    with head.constant_bias() if isinstance(head, RewardHead) else contextlib.nullcontext():
        r = policy.sequence_rewards(ids, attn)
    r_w, r_l = r[:B], r[B:]
    z = (r_w - r_l) / kw["temperature"] - kw["margin"]
    loss = F.softplus(-z).mean()  # −log σ(z)
    with torch.no_grad():
        metrics = {
            "preference_accuracy": (r_w > r_l).to(r.dtype).mean(),
            "reward_margin": (r_w - r_l).mean(),
            "chosen_reward_mean": r_w.mean(),
            "rejected_reward_mean": r_l.mean(),
            "chosen_reward_std": r_w.std(unbiased=False),
            "rejected_reward_std": r_l.std(unbiased=False),
        }
    return Computed(loss=loss, metrics=metrics)


# --- spec and drop-in form -------------------------------------------------------------------

reward_modeling = register_loss(LossSpec(
    name="reward_modeling",
    batch=BATCH,
    defaults=DEFAULTS,
    checks=COMMON_CHECKS,
    compute=_reward_modeling,
    needs_reward_head=True,
    min_tokens=1,  # a reward is read at the last token: a one-token sequence has one
    metric_names=METRICS,
    summary="−log σ((r_w − r_l)/temperature − margin)",
))


class RewardModelingLoss(LossModule):
    """``RewardModelingLoss(reward_head=RewardHead(H), margin=1.0)(model, batch) -> LossResult``."""

    spec = reward_modeling

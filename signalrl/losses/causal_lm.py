"""``causal_lm``: supervised fine-tuning, next-token cross entropy through the fused linear op.

    loss       = agg over label tokens of −log p(labels[t] | input_ids[<t])     (token-mean by default)
    perplexity = exp(mean NLL per label token),  num_tokens = number of label tokens

Label tokens: ``labels`` (aligned with input_ids as in Hugging Face; −100 = ignored) else input_ids,
restricted to tokens predicted from a real context, times ``loss_mask`` if given.
"""
from __future__ import annotations

import torch

from ._common import COMMON_CHECKS, _aggregate, masked_sum, select
from .base import Computed, Field, LossModule, LossSpec
from .model import IGNORE_INDEX, predicted_mask
from .registry import register_loss

# --- batch spec ------------------------------------------------------------------------------

BATCH = (
    Field("input_ids", ("B", "T"), "int"),
    Field("attention_mask", ("B", "T"), "mask"),
    Field("labels", ("B", "T"), "int", required=False, doc="targets aligned with input_ids; -100 = ignored"),
    Field("loss_mask", ("B", "T"), "mask", required=False, doc="1 = token counts"),
)

# --- defaults --------------------------------------------------------------------------------

DEFAULTS = dict(loss_aggregation="token-mean")
METRICS = ("loss", "perplexity", "num_tokens")

# --- math ------------------------------------------------------------------------------------


def _causal_lm(policy, batch, kw) -> Computed:
    ids, attn = batch["input_ids"], batch["attention_mask"]
    dt = policy.compute_dtype  # float32, or float64 for a float64 model
    labels = batch.get("labels", ids)
    mask = select(predicted_mask(attn, dt), labels != IGNORE_INDEX)
    if "loss_mask" in batch:  # a weight per token; ignored where nothing is predicted
        mask = select(batch["loss_mask"].to(dt), mask)
    labels = torch.where(mask != 0, labels, torch.full_like(labels, IGNORE_INDEX))
    lp = policy.token_logprobs(ids, attn, labels=labels).to(dt)
    loss = _aggregate(-lp, mask, kw["loss_aggregation"])
    with torch.no_grad():
        n = mask.sum()
        mean_nll = masked_sum(-lp, mask) / n.clamp_min(1.0)
        metrics = {"perplexity": torch.exp(mean_nll), "num_tokens": n}
    return Computed(loss=loss, metrics=metrics)


# --- spec and drop-in form -------------------------------------------------------------------

causal_lm = register_loss(LossSpec(
    name="causal_lm",
    batch=BATCH,
    defaults=DEFAULTS,
    checks=COMMON_CHECKS,
    compute=_causal_lm,
    metric_names=METRICS,
    summary="next-token cross entropy over label tokens",
))


class CausalLMLoss(LossModule):
    """``CausalLMLoss()(model, batch) -> LossResult``."""

    spec = causal_lm

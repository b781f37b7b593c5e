"""``dpo``: direct preference optimization (with conservative label smoothing).

    logπ(y|x) = Σ over response tokens of log π(y_t | x, y_<t)            (same for π_ref)
    h         = [logπ(y_w|x) − logπ_ref(y_w|x)] − [logπ(y_l|x) − logπ_ref(y_l|x)]
    loss      = mean_B[ (1 − ε)·(−log σ(β·h)) + ε·(−log σ(−β·h)) ]          ε = label_smoothing

Response tokens: ``prompt_lengths`` (the first prompt_lengths[b] real tokens of both sequences are the
prompt) and/or ``chosen_loss_mask`` / ``rejected_loss_mask`` (1 = counts); by default every predicted
token. Reference sequence log-probs may be precomputed in the batch (``ref_chosen_log_probs``,
``ref_rejected_log_probs``); otherwise they come from the reference, without gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import COMMON_CHECKS, select, sequence_logprob
from .base import Computed, Field, LossModule, LossSpec
from .model import predicted_mask
from .registry import register_loss

# --- batch spec ------------------------------------------------------------------------------

BATCH = (
    Field("chosen_input_ids", ("B", "Tc"), "int", doc="prompt + preferred response"),
    Field("chosen_attention_mask", ("B", "Tc"), "mask"),
    Field("rejected_input_ids", ("B", "Tr"), "int", doc="prompt + dispreferred response"),
    Field("rejected_attention_mask", ("B", "Tr"), "mask"),
    Field("prompt_lengths", ("B",), "int", required=False, doc="prompt tokens at the start of each (real) sequence"),
    Field("chosen_loss_mask", ("B", "Tc"), "mask", required=False, doc="1 = response token that counts"),
    Field("rejected_loss_mask", ("B", "Tr"), "mask", required=False),
    Field("ref_chosen_log_probs", ("B",), "float", required=False, doc="precomputed log π_ref(y_w|x)"),
    Field("ref_rejected_log_probs", ("B",), "float", required=False, doc="precomputed log π_ref(y_l|x)"),
)

# --- defaults --------------------------------------------------------------------------------

DEFAULTS = dict(beta=0.1, reference_model=None, label_smoothing=0.0)
CHECKS = dict(COMMON_CHECKS, beta=COMMON_CHECKS["temperature"])  # β > 0
METRICS = ("implicit_reward", "chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy", "loss")

# --- math ------------------------------------------------------------------------------------


def response_tokens(attention_mask, prompt_lengths=None, loss_mask=None, dtype=torch.float32):
    """``[B, T]`` in ``dtype``: predicted tokens, minus the first ``prompt_lengths`` real tokens, weighted by
    ``loss_mask`` (what ``loss_mask`` holds outside those tokens is ignored)."""
    m = predicted_mask(attention_mask, dtype)
    if prompt_lengths is not None:
        index_among_real = (attention_mask != 0).long().cumsum(-1) - 1  # 0 for the first real token
        m = select(m, index_among_real >= prompt_lengths.long().unsqueeze(-1))
    if loss_mask is not None:
        m = select(loss_mask.to(dtype), m)
    return m


def pair_batch(batch, pad_id: int = 0):
    """Chosen and rejected stacked into one ``[2B, T]`` batch (right-padded to a common T)."""
    ci, ca, ri, ra = (batch[k] for k in (
        "chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask"))
    T = max(ci.shape[1], ri.shape[1])

    def pad(x, value):
        return F.pad(x, (0, T - x.shape[1]), value=value)

    ids = torch.cat([pad(ci, pad_id), pad(ri, pad_id)])
    attn = torch.cat([pad((ca != 0).long(), 0), pad((ra != 0).long(), 0)])
    return ids, attn, T


def _dpo(policy, batch, kw) -> Computed:
    B = batch["chosen_input_ids"].shape[0]
    dt = policy.compute_dtype  # float32, or float64 for a float64 model
    ids, attn, T = pair_batch(batch)
    pl = batch.get("prompt_lengths")
    masks = []
    for side in ("chosen", "rejected"):
        m = response_tokens(batch[f"{side}_attention_mask"], pl, batch.get(f"{side}_loss_mask"), dt)
        masks.append(F.pad(m, (0, T - m.shape[1])))
    mask = torch.cat(masks)

    logp = sequence_logprob(policy.token_logprobs(ids, attn).to(dt), mask)
    pi_w, pi_l = logp[:B], logp[B:]
    if "ref_chosen_log_probs" in batch and "ref_rejected_log_probs" in batch:
        ref_w, ref_l = batch["ref_chosen_log_probs"].to(dt), batch["ref_rejected_log_probs"].to(dt)
    else:
        ref_lp = policy.reference_logprobs(ids, attn, reference_model=kw["reference_model"]).to(dt)
        ref = sequence_logprob(ref_lp, mask)
        ref_w, ref_l = ref[:B], ref[B:]

    loss, metrics = dpo_objective(pi_w, pi_l, ref_w, ref_l, kw["beta"], kw["label_smoothing"])
    return Computed(loss=loss, metrics=metrics)


def dpo_objective(pi_w: Tensor, pi_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, eps: float
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO loss from sequence log-probs ``[B]``: mean of (1−ε)·softplus(−β·h) + ε·softplus(β·h) with
    h = (π_w − ref_w) − (π_l − ref_l); and the implicit-reward metrics (detached)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    loss = ((1.0 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h)).mean()
    with torch.no_grad():
        chosen_r, rejected_r = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
        metrics = {
            "implicit_reward": torch.cat([chosen_r, rejected_r]).mean(),
            "chosen_reward": chosen_r.mean(),
            "rejected_reward": rejected_r.mean(),
            "reward_margin": (chosen_r - rejected_r).mean(),
            "preference_accuracy": (chosen_r > rejected_r).to(h.dtype).mean(),
        }
    return loss, metrics


# --- spec and drop-in form -------------------------------------------------------------------

dpo = register_loss(LossSpec(
    name="dpo",
    batch=BATCH,
    defaults=DEFAULTS,
    checks=CHECKS,
    compute=_dpo,
    uses_reference=True,
    metric_names=METRICS,
    summary="−log σ(β·[(logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l))]), label-smoothed",
))


class DPOLoss(LossModule):
    """``DPOLoss(beta=0.1, reference_model=ref)(model, batch) -> LossResult``."""

    spec = dpo

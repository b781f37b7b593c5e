"""``nn.Module`` losses from final hidden states and the LM-head weight, for hand-written training loops.

The shape Liger-Kernel's users know — build once with the loss options, call with ``(hidden, weight, targets, …)``::

    ce   = LinearCrossEntropyLoss()                       # ignore_index=-100, reduction="mean"
    loss = ce(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:])

    grpo = LinearGRPOLoss(beta=0.04, clip_epsilon=0.2, loss_aggregation="token-mean")
    loss, metrics = grpo(hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs=ref)

    dpo  = LinearDPOLoss(beta=0.1)
    loss, metrics = dpo(hidden, weight, targets, ref_chosen_logps, ref_rejected_logps)   # rows: chosen, then rejected

Rows of ``hidden`` are aligned with ``targets``: row t is the hidden state that predicts ``targets[t]`` (for a causal
LM: ``hidden[:, :-1]`` with ``input_ids[:, 1:]``). Targets equal to ``ignore_index`` (-100) never count. None of
these ever holds ``[N, V]`` logits (the fused ops stream the vocabulary); losses and log-probs are float32. The
options have the names and defaults of the corresponding Signal losses (:mod:`signalrl.losses.grpo`,
:mod:`signalrl.losses.dpo`) and are validated the same way (an unknown or bad option is a ``ValueError``). Metrics
are detached 0-d tensors (no host sync); call ``float()`` on the ones you log.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..losses.dpo import dpo as _dpo_spec
from ..losses.dpo import dpo_objective
from ..losses.grpo import grpo as _grpo_spec

__all__ = ["LinearCrossEntropyLoss", "LinearDPOLoss", "LinearGRPOLoss"]

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def _options(spec, kwargs: dict) -> dict:
    kw = spec.resolve_kwargs(kwargs)
    if kw.pop("reference_model", None) is not None:
        raise ValueError(
            f"{spec.name}: reference_model is not an option of the module form; pass the reference "
            "log-probs (or hidden states) to the call"
        )
    return kw


def _counted(targets: Tensor, mask: Tensor | None, ignore_index: int) -> Tensor:
    m = (targets != ignore_index).to(torch.float32)
    return m if mask is None else m * (mask != 0).to(torch.float32)


def _check_rows(name: str, x: Tensor, targets: Tensor) -> None:
    if tuple(x.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"{name}: expected rows {tuple(targets.shape)} (targets.shape) × H, got shape {tuple(x.shape)}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of ``softmax((hidden @ weight.T + bias) / temperature)`` against ``targets``.

    ``LinearCrossEntropyLoss(ignore_index=-100, reduction="mean", temperature=1.0)``;
    call ``(hidden [..., H], weight [V, H], targets [...], bias=None, num_items_in_batch=None)``.
    ``reduction``: ``mean`` over non-ignored targets (or the sum divided by ``num_items_in_batch`` when given —
    how Hugging Face ``Trainer`` keeps gradient accumulation exact), ``sum``, or ``none`` (per-target ``[...]``,
    0 where ignored). Returns float32.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", temperature: float = 1.0):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.temperature = float(temperature)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                num_items_in_batch: Tensor | int | None = None) -> Tensor:
        nll = -ops.linear_token_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature, ignore_index=self.ignore_index
        )
        if self.reduction == "none":
            return nll
        total = nll.sum()
        if self.reduction == "sum":
            return total
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return total / (targets != self.ignore_index).sum()  # 0/0 = NaN for all-ignored, as cross_entropy


class LinearGRPOLoss(nn.Module):
    """The GRPO policy loss (clipped surrogate + ``beta``·KL) from hidden states, in one fused pass
    (:func:`signalrl.ops.linear_ppo_loss`).

    Options (those of :mod:`signalrl.losses.grpo`): ``beta=0.01``, ``clip_epsilon=0.2``, ``clip_epsilon_high=None``,
    ``log_ratio_clamp=20.0``, ``scale_rewards=True``, ``advantage_epsilon=1e-6``, ``max_completion_length=None``,
    ``kl_estimator="k3"``, ``loss_aggregation="token-mean"``, ``temperature=1.0``.

    Call ``(hidden [B, T, H], weight [V, H], targets [B, T], old_logprobs=None, advantages=None, mask=None, *,
    rewards=None, num_generations=None, ref_logprobs=None, bias=None)`` → ``(loss, metrics)``:

    - ``old_logprobs`` ``[B, T]``: sampling-time log-probs; None = the current policy, detached (ratio 1).
    - ``advantages``: ``[B]`` (one per sequence) or ``[B, T]``; or give ``rewards`` ``[B]`` with
      ``num_generations`` G (consecutive groups of G rows) and they are group-normalized
      (``scale_rewards``, ``advantage_epsilon``; :func:`signalrl.ops.group_normalize`).
    - ``mask`` ``[B, T]``: 1 = a counted (completion) token, combined with ``targets != -100``.
    - ``ref_logprobs`` ``[B, T]``: needed when ``beta > 0``.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO) divides by B·``max_completion_length`` (default T).

    Metrics: ``policy_loss``, ``kl_divergence``, ``clip_fraction``, ``entropy``, ``approx_kl``, ``ratio_mean``.
    """

    def __init__(self, **options):
        super().__init__()
        self.options = _options(_grpo_spec, options)

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor | None = None,
                advantages: Tensor | None = None, mask: Tensor | None = None, *, rewards: Tensor | None = None,
                num_generations: int | None = None, ref_logprobs: Tensor | None = None, bias: Tensor | None = None):
        kw = self.options
        if targets.dim() != 2:
            raise ValueError(f"targets: expected [B, T], got shape {tuple(targets.shape)}")
        _check_rows("hidden", hidden, targets)
        B, T = targets.shape
        if advantages is None:
            if rewards is None or num_generations is None:
                raise ValueError("advantages: pass advantages [B] / [B, T], or rewards [B] with num_generations")
            if rewards.numel() != B or B % int(num_generations):
                raise ValueError(
                    f"rewards: expected [B] = [{B}] in groups of num_generations={num_generations}, got shape "
                    f"{tuple(rewards.shape)}"
                )
            with torch.no_grad():
                advantages = ops.group_normalize(
                    rewards.reshape(-1, int(num_generations)).float(), eps=kw["advantage_epsilon"],
                    scale=kw["scale_rewards"],
                ).reshape(B)
        if advantages.dim() == 1:
            if advantages.shape[0] != B:
                raise ValueError(f"advantages: expected [B] = [{B}] or [B, T], got shape {tuple(advantages.shape)}")
            advantages = advantages.unsqueeze(1).expand(B, T)
        if kw["beta"] > 0 and ref_logprobs is None:
            raise ValueError("ref_logprobs: required when beta > 0 (pass the reference log-probs, or beta=0)")
        if old_logprobs is None:
            with torch.no_grad():
                old_logprobs = ops.linear_token_logprobs(
                    hidden.detach(), weight.detach(), targets, bias=None if bias is None else bias.detach(),
                    temperature=kw["temperature"],
                )
        loss, stats = ops.linear_ppo_loss(
            hidden, weight, targets, old_logprobs, advantages, mask, bias=bias,
            ref_logprobs=ref_logprobs if kw["beta"] > 0 else None, temperature=kw["temperature"],
            clip_low=kw["clip_epsilon"], clip_high=kw["clip_epsilon_high"], kl_coef=kw["beta"],
            kl_estimator=kw["kl_estimator"], aggregation=kw["loss_aggregation"],
            log_ratio_clamp=kw["log_ratio_clamp"],
        )
        pg = stats["pg_loss"]
        if kw["loss_aggregation"] == "seq-mean-token-sum-norm":
            horizon = kw["max_completion_length"] or T
            scale = T / float(horizon)  # the op divides by B·T; Dr. GRPO by B·max_completion_length
            loss, pg = loss * scale, pg * scale
        metrics = {
            "policy_loss": pg.detach(), "kl_divergence": stats["kl"].detach(),
            "clip_fraction": stats["clip_fraction"].detach(), "entropy": stats["entropy"].detach(),
            "approx_kl": stats["approx_kl"].detach(), "ratio_mean": stats["ratio_mean"].detach(),
        }
        return loss, metrics


class LinearDPOLoss(nn.Module):
    """DPO (with conservative label smoothing) from hidden states:
    ``mean[(1 − ε)·(−log σ(β·h)) + ε·(−log σ(−β·h))]``, h = (logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l)),
    logπ(y) = Σ over counted targets of log π(target).

    Options (those of :mod:`signalrl.losses.dpo`): ``beta=0.1``, ``label_smoothing=0.0``.

    Call ``(hidden, weight, targets, ref_chosen_logps=None, ref_rejected_logps=None, *, mask=None, bias=None,
    ref_hidden=None, ref_weight=None, ref_bias=None)`` → ``(loss, metrics)``:

    - ``hidden`` ``[2B, T, H]`` with ``targets`` ``[2B, T]``: the B chosen rows, then the B rejected rows (TRL's and
      Liger's order); or pairs ``(chosen_hidden, rejected_hidden)`` / ``(chosen_targets, rejected_targets)`` of any
      two lengths. ``mask`` (same layout, optional): 1 = a counted response token.
    - the reference: precomputed sequence log-probs ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]``, or
      ``ref_hidden`` (same layout as ``hidden``) with ``ref_weight`` (default ``weight``), run without gradients.

    Metrics (as :mod:`signalrl.losses.dpo`): ``implicit_reward``, ``chosen_reward``, ``rejected_reward``,
    ``reward_margin``, ``preference_accuracy``, plus ``chosen_logps``, ``rejected_logps``.
    """

    def __init__(self, **options):
        super().__init__()
        self.options = _options(_dpo_spec, options)

    @staticmethod
    def _sequence_logps(hidden, weight, targets, mask, bias) -> tuple[Tensor, Tensor]:
        """Σ log π(target) per row, for the chosen and the rejected rows."""
        if isinstance(hidden, (tuple, list)):
            if not isinstance(targets, (tuple, list)) or len(hidden) != 2 or len(targets) != 2:
                raise ValueError(
                    "hidden/targets: pass two tensors each, (chosen, rejected), or one [2B, ...] tensor each"
                )
            masks = mask if isinstance(mask, (tuple, list)) else (None, None)
            out = []
            for h, t, m in zip(hidden, targets, masks):
                _check_rows("hidden", h, t)
                lp = ops.linear_token_logprobs(h, weight, t, bias=bias)
                out.append((lp * _counted(t, m, IGNORE_INDEX)).reshape(t.shape[0], -1).sum(-1))
            if out[0].shape != out[1].shape:
                raise ValueError(f"hidden: chosen and rejected batches differ ({out[0].shape[0]} vs {out[1].shape[0]})")
            return out[0], out[1]
        _check_rows("hidden", hidden, targets)
        if targets.shape[0] % 2:
            raise ValueError(f"targets: expected 2B rows (chosen, then rejected), got {targets.shape[0]}")
        lp = ops.linear_token_logprobs(hidden, weight, targets, bias=bias)
        seq = (lp * _counted(targets, mask, IGNORE_INDEX)).reshape(targets.shape[0], -1).sum(-1)
        return seq.chunk(2)

    def forward(self, hidden, weight: Tensor, targets, ref_chosen_logps: Tensor | None = None,
                ref_rejected_logps: Tensor | None = None, *, mask=None, bias: Tensor | None = None,
                ref_hidden=None, ref_weight: Tensor | None = None, ref_bias: Tensor | None = None):
        beta, eps = self.options["beta"], self.options["label_smoothing"]
        pi_w, pi_l = self._sequence_logps(hidden, weight, targets, mask, bias)
        if ref_chosen_logps is None or ref_rejected_logps is None:
            if ref_hidden is None:
                raise ValueError("ref_chosen_logps/ref_rejected_logps: pass both, or ref_hidden (and ref_weight)")
            with torch.no_grad():
                detach = (lambda x: x.detach()) if not isinstance(ref_hidden, (tuple, list)) else (
                    lambda x: tuple(y.detach() for y in x))
                rw = (weight if ref_weight is None else ref_weight).detach()
                rb = bias if ref_weight is None else ref_bias
                ref_chosen_logps, ref_rejected_logps = self._sequence_logps(
                    detach(ref_hidden), rw, targets, mask, None if rb is None else rb.detach()
                )
        ref_w, ref_l = ref_chosen_logps.float(), ref_rejected_logps.float()
        loss, metrics = dpo_objective(pi_w, pi_l, ref_w, ref_l, beta, eps)
        metrics.update(chosen_logps=pi_w.detach().mean(), rejected_logps=pi_l.detach().mean())
        return loss, metrics

"""TRL's trainers with Signal's kernels: ``SignalGRPOTrainer``, ``SignalDPOTrainer``, ``SignalSFTTrainer``.

One-line change: ``GRPOTrainer(...)`` → ``SignalGRPOTrainer(...)`` (same arguments, same config).

How (no TRL source is patched): TRL ≥ 1.16 gives the policy (and the reference) a "fused LM head":
``model(..., labels=labels, fused_lm_head=True)`` returns per-token ``log_probs`` (and ``entropy`` …) instead of
logits, and every loss of these trainers is computed from those. After TRL's ``__init__`` has installed its head,
the Signal trainers install theirs on top, on the model instances only: the same call returns the same fields,
computed by :func:`signalrl.ops.linear_token_logprobs` from the backbone's hidden states and the head weight (only the
positions with a label, no ``[B, T, V]`` logits; Triton on GPUs, native C++ on CPUs). Calls without
``fused_lm_head`` (generation) go to TRL's forward unchanged; a model the fused path cannot reproduce exactly
(soft-capping, logit scaling, a LoRA-wrapped or quantized head) and MoE calls that ask for router logits keep TRL's
own head. TRL's loss code then runs as is, so every loss variant of the trainer keeps its exact semantics and
metrics.

``SignalGRPOTrainer`` additionally computes the GRPO loss itself in one fused pass
(:func:`signalrl.ops.linear_ppo_loss`: log-probs, ratio, clip, KL and aggregation per vocab tile) for ``loss_type``
``grpo``, ``bnpo``, ``dr_grpo`` and ``dapo`` when the batch carries ``old_per_token_logps`` (``num_iterations > 1``, or
``steps_per_generation > gradient_accumulation_steps``) and no option outside that op is on (see
:meth:`SignalGRPOTrainer.signal_fused_loss_reason`).
With ``old_per_token_logps`` absent the ratio is 1 and the log-prob path is as cheap. The fused pass logs ``kl``,
``entropy`` and ``clip_ratio/region_mean`` (not the per-side ``clip_ratio/low_*``/``high_*``).
"""
from __future__ import annotations

import functools
import types
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..losses.model import PolicyModel, find_backbone

try:
    import trl
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "signalrl.integrations.trainers needs trl >= 1.16 (pip install 'signal-rl[trl]'); "
        f"importing it failed: {e}"
    ) from e

__all__ = ["SignalDPOTrainer", "SignalGRPOTrainer", "SignalSFTTrainer", "install_fused_head"]

IGNORE_INDEX = -100
_HEAD_STATE = "_signalrl_trl_head"
_MAX_CHUNK_ELEMS = 1 << 24  # rows × V of one no-grad logits chunk for the metric-only fields (64 MiB in float32)
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes", "num_tiles",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
_FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# --- the fused head --------------------------------------------------------------------------------


@torch.no_grad()
def _metric_fields(h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor, temperature: float,
                   outputs: tuple[str, ...]) -> dict[str, Tensor]:
    """The metric-only fields TRL's head can return, for the scored rows ``h`` ``[n, H]`` (no gradients).

    ``mean_logits`` is exact without logits: mean_v z_v = (h·mean_v W_v + mean_v b_v) / T. ``is_top1`` and
    ``log_sum_sq_probs`` need every logit: row chunks of at most 2^24 logits, dropped as soon as reduced."""
    out: dict[str, Tensor] = {}
    if "mean_logits" in outputs:
        w_mean = weight.mean(0, dtype=torch.float32)
        m = h.float() @ w_mean
        if bias is not None:
            m = m + bias.float().mean()
        out["mean_logits"] = m / temperature
    want_top1, want_sq = "is_top1" in outputs, "log_sum_sq_probs" in outputs
    if want_top1 or want_sq:
        V = weight.shape[0]
        rows = max(1, _MAX_CHUNK_ELEMS // max(V, 1))
        top1, sq = [], []
        for r0 in range(0, h.shape[0], rows):
            z = nn.functional.linear(h[r0:r0 + rows], weight, bias).float()
            if want_top1:  # argmax returns the first maximum: a tie with an earlier token is not a top-1 hit
                top1.append(z.argmax(-1) == t[r0:r0 + rows])
            if want_sq:
                z = z / temperature
                sq.append(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
        if want_top1:
            out["is_top1"] = torch.cat(top1) if top1 else t.new_zeros(0, dtype=torch.bool)
        if want_sq:
            out["log_sum_sq_probs"] = torch.cat(sq) if sq else h.new_zeros(0, dtype=torch.float32)
    return out


def fused_head_outputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *,
                       temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",),
                       num_items_in_batch=None) -> FusedCausalLMOutput:
    """TRL's ``FusedCausalLMOutput`` from shifted hidden states ``[B, T', H]`` and labels ``[B, T']`` with Signal's op.

    Only positions whose label is not -100 are scored; every per-token field is 0 there (``is_top1`` False)."""
    H = hidden.shape[-1]
    mask = labels != IGNORE_INDEX
    flat = mask.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    h = hidden.reshape(-1, H).index_select(0, idx)
    if h.device != weight.device:
        h, idx, flat, mask = h.to(weight.device), idx.to(weight.device), flat.to(weight.device), mask.to(weight.device)
    if h.dtype != weight.dtype:  # autocast, or TRL's cast_lm_head_to_fp32: score in the head's dtype
        h = h.to(weight.dtype)
    t = labels.reshape(-1).to(weight.device).index_select(0, idx)
    with torch.autocast(h.device.type, enabled=False):
        res = ops.linear_token_logprobs(
            h, weight, t, bias=bias, temperature=temperature, return_entropy="entropy" in outputs
        )
    lp, ent = res if "entropy" in outputs else (res, None)
    N = flat.shape[0]

    def scatter(x: Tensor | None):
        if x is None:
            return None
        full = x.new_zeros(N).index_copy(0, idx, x) if x.dtype != torch.bool else \
            torch.zeros(N, dtype=torch.bool, device=x.device).index_copy(0, idx, x)
        return full.reshape(mask.shape)

    extra = _metric_fields(h.detach(), weight.detach(), None if bias is None else bias.detach(), t, temperature,
                           outputs)
    log_probs = scatter(lp)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / denom,
        log_probs=log_probs,
        entropy=scatter(ent),
        log_sum_sq_probs=scatter(extra.get("log_sum_sq_probs")),
        mean_logits=scatter(extra.get("mean_logits")),
        is_top1=scatter(extra.get("is_top1")),
        label_mask=mask,
    )


def _fused_reason(model: nn.Module) -> str | None:
    """Why Signal's op cannot reproduce this model's logits (None if it can)."""
    return PolicyModel(model).fused_unsupported_reason()


def _signal_head_forward(self, *args, **kwargs):
    state = self.__dict__[_HEAD_STATE]
    previous = state["previous"] or types.MethodType(type(self).forward, self)
    if not kwargs.get("fused_lm_head", False):
        kwargs.pop("fused_lm_head", None)
        return previous(*args, **kwargs)
    text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
    moe = kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)
    head_fn: Callable | None = kwargs.pop("signal_head_fn", None)
    if (moe and head_fn is None) or _fused_reason(self) is not None:
        if head_fn is not None:
            raise ValueError("signal_head_fn: this model's output layer is not supported by the fused path")
        if state["previous"] is None:
            raise ValueError(
                f"{type(self).__name__}: {_fused_reason(self) or 'an MoE router-logits call'} needs TRL's own fused "
                "head: call trl.trainer.utils.add_fused_lm_head(model) before install_fused_head(model)"
            )
        return previous(*args, **kwargs)  # TRL's own head (soft-capping, scaling, LoRA head, MoE aux loss)
    kwargs.pop("fused_lm_head")
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    out = find_backbone(self)(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = self.get_output_embeddings()
    if head_fn is not None:  # inside the root module's forward, where FSDP has the head gathered
        return head_fn(hidden, head.weight, head.bias, labels)
    return fused_head_outputs(
        hidden, head.weight, head.bias, labels, temperature=state["temperature"], outputs=state["outputs"],
        num_items_in_batch=num_items_in_batch,
    )


def install_fused_head(model: nn.Module, *, temperature: float = 1.0,
                       outputs: tuple[str, ...] = ("log_probs",)) -> nn.Module:
    """Serve TRL's ``model(..., labels=..., fused_lm_head=True)`` with Signal's op on this instance (the causal LM
    under any accelerate / peft wrapper). Whatever ``forward`` the instance had (TRL's head, installed first by
    ``add_fused_lm_head``) handles every other call, and the fused calls Signal's op cannot reproduce. Idempotent (a
    second call updates ``temperature`` and ``outputs``). Returns ``model``."""
    target = model
    while hasattr(target, "module") and isinstance(target.module, nn.Module):  # DDP / accelerate wrappers
        target = target.module
    if hasattr(target, "get_base_model") and hasattr(target, "disable_adapter"):
        target = target.get_base_model()
    state = target.__dict__.get(_HEAD_STATE)
    if state is not None:
        state.update(temperature=float(temperature), outputs=tuple(outputs))
        return model
    previous = target.__dict__.get("forward")
    target.__dict__[_HEAD_STATE] = {"previous": previous, "temperature": float(temperature), "outputs": tuple(outputs)}

    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        return _signal_head_forward(self, *args, **kwargs)

    target.forward = types.MethodType(forward, target)
    return model


def _is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


# --- the trainers ----------------------------------------------------------------------------------


class SignalGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with Signal's kernels: the per-token log-probs and entropies of the policy and the
    reference from :func:`signalrl.ops.linear_token_logprobs`, and — for ``loss_type`` ``grpo``, ``bnpo``,
    ``dr_grpo``, ``dapo`` with ``old_per_token_logps`` in the batch — the whole loss from
    :func:`signalrl.ops.linear_ppo_loss`. Same arguments as ``GRPOTrainer``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_fused_head(self.model, temperature=self.temperature, outputs=("log_probs", "entropy"))
        if self.ref_model is not None:
            install_fused_head(self.ref_model, temperature=self.temperature)

    def signal_fused_loss_reason(self, inputs) -> str | None:
        """Why this batch's loss is not computed by the one-pass fused GRPO op (None if it is)."""
        args = self.args
        if self.loss_type not in _FUSED_LOSS_TYPES:
            return f"loss_type={self.loss_type!r}"
        if inputs.get("old_per_token_logps") is None:
            return "no old_per_token_logps (ratio 1: the log-prob path is as cheap)"
        checks = (
            (self.importance_sampling_level != "token", "importance_sampling_level='sequence'"),
            (getattr(args, "delta", None) is not None, "delta (two-sided clipping)"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
            (self.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
            (self.use_vllm and self.vllm_importance_sampling_correction, "vLLM importance-sampling correction"),
            (getattr(self, "_entropy_bonus_enabled", False), "an entropy bonus"),
            (self.aux_loss_enabled, "an MoE aux loss"),
            (self.beta != 0.0 and getattr(args, "use_bias_correction_kl", False), "use_bias_correction_kl (beta > 0)"),
            (any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS), "multimodal inputs"),
        )
        for bad, why in checks:
            if bad:
                return why
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if _is_peft(base) else base
        return _fused_reason(base)

    def _compute_loss(self, model, inputs):
        if self.signal_fused_loss_reason(inputs) is not None:
            return super()._compute_loss(model, inputs)
        return self._signal_fused_loss(model, inputs)

    def _signal_fused_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        L = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.to(torch.float32)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        advantages = advantages.to(torch.float32).expand(mask.shape)
        old = inputs["old_per_token_logps"]
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        aggregation = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                       "dapo": "token-mean"}[self.loss_type]
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, :-L] = IGNORE_INDEX

        def head_fn(hidden, weight, bias, targets):
            h, t = hidden[:, -L:], targets[:, -L:]
            if h.dtype != weight.dtype:
                h = h.to(weight.dtype)
            with torch.autocast(h.device.type, enabled=False):
                return ops.linear_ppo_loss(
                    h, weight, t, old, advantages, mask, bias=bias, ref_logprobs=ref, temperature=self.temperature,
                    clip_low=self.epsilon_low, clip_high=self.epsilon_high, kl_coef=self.beta, kl_estimator="k3",
                    aggregation=aggregation, log_ratio_clamp=None,
                )

        with self.accelerator.autocast():
            loss, stats = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                fused_lm_head=True, signal_head_fn=head_fn)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        counted = mask.sum()
        B = mask.shape[0]
        if self.loss_type == "grpo":  # TRL averages over every sequence, an empty one included
            loss = loss * ((mask.sum(-1) > 0).sum().clamp(min=1) / B)
        elif self.loss_type == "dr_grpo":  # the op divides by B·L; TRL by B·max_completion_length
            loss = loss * (L / self.max_completion_length)
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss * counted.clamp(min=1.0) / normalizer
        else:
            loss = loss / accumulation

        def global_mean(x: Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([x.detach() * counted, counted]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(stats["kl"]))
        self._metrics[mode]["entropy"].append(global_mean(stats["entropy"]))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(stats["clip_fraction"]))
        return loss


class SignalDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with the per-token log-probs (policy and reference) from Signal's fused op; every TRL DPO
    ``loss_type`` (``sigmoid``, ``ipo``, ``hinge``, …), ``ld_alpha``, ``use_weighting`` and f-divergence keeps
    TRL's math and metrics. Same arguments as ``DPOTrainer``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if self.use_weighting:
            outputs += ("log_sum_sq_probs",)
        install_fused_head(self.model, outputs=outputs)
        if self.ref_model is not None:
            install_fused_head(self.ref_model)


class SignalSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with the token log-probs (loss, entropy and accuracy metrics) from Signal's fused op.
    Same arguments as ``SFTTrainer``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_fused_head(self.model, outputs=("log_probs", "entropy", "is_top1"))


def _check_trl_version() -> None:
    from packaging.version import Version

    if Version(trl.__version__) < Version("1.16"):  # pragma: no cover
        raise ImportError(
            f"signalrl.integrations.trainers needs trl >= 1.16 (the fused LM head); found {trl.__version__}"
        )


_check_trl_version()

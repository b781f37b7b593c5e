"""The policy as the losses see it: a Hugging Face causal LM (plain or peft-wrapped) plus optional
value / reward heads and a reference.

Alignment: every per-token array is ``[B, T]`` aligned with ``input_ids``. Entry ``t`` of
``token_logprobs`` is log p(input_ids[t] | input_ids[<t]); entry 0 is 0. Entry ``t`` of ``values`` is
V(input_ids[<t]), the value of the state in which token t is chosen (the value head on the hidden
state at t − 1); entry 0 is 0. So an action at position t has its log-prob, value and reward at t.

The large-vocabulary path: the backbone gives the final hidden states ``[B, T, H]`` (after the final
norm), and :func:`signalrl.ops.linear_token_logprobs` consumes them with the LM-head weight
``[V, H]`` without ever materializing ``[B, T, V]`` logits. A model the fused path cannot reproduce
(final-logit soft-capping, logit scaling, an LM head that is not a plain ``nn.Linear`` such as a
LoRA-wrapped head) falls back to the model's own logits and :func:`signalrl.ops.token_logprobs`,
with a one-time warning.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops


IGNORE_INDEX = -100


# Config settings that change the logits after the LM head (with their neutral values): Gemma-2's soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, Muse's output_multiplier.
LOGIT_SETTINGS = (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0),
                  ("lm_head_multiplier", 1.0), ("output_multiplier", 1.0))


class FusedPathWarning(UserWarning):
    """A model needs full logits (the fused hidden-state path cannot reproduce its output layer)."""


_POSITION_IDS: dict = {}


def _accepts_position_ids(forward) -> bool:
    """Whether ``forward`` takes ``position_ids`` (its signature, read once per function: ``inspect.signature`` of
    a Hugging Face forward costs ~0.2 ms, on every step otherwise)."""
    fn = getattr(forward, "__func__", forward)
    hit = _POSITION_IDS.get(fn)
    if hit is None:
        try:
            hit = "position_ids" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            hit = False
        if len(_POSITION_IDS) < 1024:
            _POSITION_IDS[fn] = hit
    return hit


class ValueHead(nn.Module):
    """V(s) = w·h + b on the final hidden state: ``Linear(hidden_size, 1)`` (float32 weights; ``.double()``
    it for a float64 run)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """``[..., H]`` → ``[...]``, computed and returned in float32, or in float64 when the hidden
        states or the head are float64 (a float64 run stays float64 end to end)."""
        w, b = self.linear.weight, self.linear.bias
        dt = torch.promote_types(torch.promote_types(hidden.dtype, w.dtype), torch.float32)
        out = nn.functional.linear(hidden.to(dt), w.to(dt), None if b is None else b.to(dt))
        return out.squeeze(-1)


class RewardHead(ValueHead):
    """r(x, y) = w·h_last + b: ``Linear(hidden_size, 1)`` applied at the last non-padding token.

    Inside ``with head.constant_bias():`` b enters r with its value but an exactly zero gradient — for losses of
    reward *differences* only (Bradley–Terry), where b cancels: its true gradient is 0, while float rounding of
    Σ ∂L/∂r (and a cross-rank sum) would leave noise that Adam turns into ±lr steps."""

    _constant_bias = False

    @contextlib.contextmanager
    def constant_bias(self):
        prev = self._constant_bias
        self._constant_bias = True
        try:
            yield self
        finally:
            self._constant_bias = prev

    def forward(self, hidden: Tensor) -> Tensor:
        b = self.linear.bias
        if not self._constant_bias or b is None:
            return super().forward(hidden)
        w = self.linear.weight
        dt = torch.promote_types(torch.promote_types(hidden.dtype, w.dtype), torch.float32)
        out = nn.functional.linear(hidden.to(dt), w.to(dt), _ZeroGrad.apply(b).to(dt))
        return out.squeeze(-1)


class _ZeroGrad(torch.autograd.Function):
    """x itself forward; an exactly zero gradient backward (a zero tensor, not None: the optimizer sees a zero
    gradient, as the math says)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad)


def predicted_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """1 where token t is predicted from a real context: attention_mask[t] and attention_mask[t−1];
    0 at t = 0. 0/1 ``[B, T]`` in ``dtype`` (float32 by default). (attention_mask shifted to the predicted tokens.)"""
    real = attention_mask != 0
    out = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    out[:, 1:] = (real[:, 1:] & real[:, :-1]).to(dtype)
    return out


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last non-padding token of each row ``[B]`` (left or right padding)."""
    T = attention_mask.shape[-1]
    flipped = attention_mask.flip(-1).to(torch.float32)
    return (T - 1) - flipped.argmax(-1)


def find_backbone(model: nn.Module) -> nn.Module:
    """The decoder under a Hugging Face causal LM: ``get_decoder()``, else the ``base_model_prefix`` attribute."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None and dec is not model:
            return dec
    prefix = getattr(model, "base_model_prefix", "model")
    dec = getattr(model, prefix, None)
    if dec is None:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (no get_decoder(), no .{prefix})")
    return dec


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class PolicyOutput:
    logprobs: Tensor  # [B, T] float32 (float64 for a float64 model)
    entropy: Tensor | None = None  # [B, T], same dtype
    values: Tensor | None = None  # [B, T], same dtype
    hidden: Tensor | None = None  # [B, T, H]


class PolicyModel(nn.Module):
    """``PolicyModel(model, *, reference_model=None, value_head=None, reward_head=None)``.

    ``model`` and the heads are sub-modules (``parameters()`` covers what trains); the reference is
    held outside the module tree, so it is never trained and never in ``parameters()``.
    """

    def __init__(self, model: nn.Module, *, reference_model=None, value_head=None, reward_head=None):
        super().__init__()
        if isinstance(model, PolicyModel):
            raise TypeError("PolicyModel(model): model is already a PolicyModel")
        self.model = model
        self.value_head = value_head
        self.reward_head = reward_head
        self._reference = [reference_model]  # a list keeps it out of the module tree
        self._fused_reason: tuple | None = None  # (what it was read from, fused_unsupported_reason())

    @property
    def reference_model(self):
        return self._reference[0]

    # --- structure ---------------------------------------------------------------------------

    def base_model(self) -> nn.Module:
        """The causal LM under any peft wrapper (LoRA layers stay injected and active)."""
        return self.model.get_base_model() if _is_peft(self.model) else self.model

    def backbone(self) -> nn.Module:
        return find_backbone(self.base_model())

    @property
    def config(self):
        return getattr(self.base_model(), "config", None)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for a float64 model (its output layer, else its first floating parameter), else float32:
        the dtype the losses read batch tensors in and compute with."""
        head = getattr(self.base_model(), "get_output_embeddings", lambda: None)()
        w = getattr(head, "weight", None)
        if not isinstance(w, Tensor):
            w = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32

    def fused_unsupported_reason(self) -> str | None:
        """Why the fused hidden-state path cannot reproduce this model's logits (None if it can). Read once per
        LM head (module and weight dtype) and config object: Hugging Face configs are slow to read on every step."""
        head = self.base_model().get_output_embeddings()
        key = (id(head), getattr(getattr(head, "weight", None), "dtype", None), id(self.config))
        cached = self._fused_reason
        if cached is not None and cached[0] == key:
            return cached[1]
        reason = self._fused_unsupported_reason(head)
        self._fused_reason = (key, reason)
        return reason

    def _fused_unsupported_reason(self, head) -> str | None:
        if type(head) is not nn.Linear:
            return f"its LM head is a {type(head).__name__}, not a plain nn.Linear"
        if not head.weight.is_floating_point():
            return f"its LM head weight is {head.weight.dtype} (quantized)"
        cfg = self.config
        if cfg is None:
            return None
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for c in {id(cfg): cfg, id(text): text}.values():
            for attr, neutral in LOGIT_SETTINGS:
                val = getattr(c, attr, neutral)
                if val is not None and val != neutral:
                    return f"its config sets {attr}={val}"
        return None

    def _fused(self) -> bool:
        reason = self.fused_unsupported_reason()
        if reason is None:
            return True
        if self.model not in _warned:
            _warned.add(self.model)
            warnings.warn(
                f"{type(self.base_model()).__name__}: {reason}; computing full [B, T, V] logits instead of the "
                "fused hidden-state path (correct, but uses more memory)",
                FusedPathWarning,
                stacklevel=3,
            )
        return False

    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """(weight ``[V, H]``, bias ``[V]`` or None) of the output layer."""
        head = self.base_model().get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the LM head is a {type(head).__name__}, not an nn.Linear")
        return head.weight, head.bias

    # --- forward passes ----------------------------------------------------------------------

    @staticmethod
    def _position_ids(attention_mask: Tensor) -> Tensor:
        # The positions Hugging Face generation uses: real tokens count 0, 1, 2, … whatever the padding.
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final hidden states ``[B, T, H]`` of the backbone (final norm applied; no logits)."""
        dec = self.backbone()
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if _accepts_position_ids(dec.forward):
            kw["position_ids"] = self._position_ids(attention_mask)
        out = dec(**kw)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if _accepts_position_ids(self.base_model().forward):
            kw["position_ids"] = self._position_ids(attention_mask)
        return self.model(**kw).logits

    @staticmethod
    def _targets(input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> Tensor:
        """Targets for positions 1..T−1 (``[B, T−1]``), IGNORE_INDEX where nothing is predicted.

        Without ``labels``: the tokens predicted from a real context (:func:`predicted_mask`). With
        ``labels`` (aligned with input_ids, IGNORE_INDEX = not counted): those labels, for t ≥ 1.
        """
        if labels is None:
            valid = predicted_mask(attention_mask)[:, 1:] > 0
            tgt = input_ids[:, 1:]
        else:
            tgt = labels[:, 1:]
            valid = tgt != IGNORE_INDEX
        return torch.where(valid, tgt, torch.full_like(tgt, IGNORE_INDEX)).long()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        labels: Tensor | None = None,
        with_entropy: bool = False,
        with_values: bool = False,
        with_hidden: bool = False,
        temperature: float = 1.0,
        hidden: Tensor | None = None,
    ) -> PolicyOutput:
        """One backbone pass → log-probs (+ entropy, values, hidden) ``[B, T]``, entry 0 = 0.

        ``hidden``: final hidden states already computed for these inputs (skips the backbone)."""
        targets = self._targets(input_ids, attention_mask, labels)
        if self._fused():
            if hidden is None:
                hidden = self.hidden_states(input_ids, attention_mask)
            weight, bias = self.lm_head()
            res = ops.linear_token_logprobs(
                hidden[:, :-1], weight, targets, bias=bias, temperature=temperature,
                ignore_index=IGNORE_INDEX, return_entropy=with_entropy,
            )
        else:
            logits = self._logits(input_ids, attention_mask)
            res = ops.token_logprobs(
                logits[:, :-1], targets, temperature=temperature, ignore_index=IGNORE_INDEX,
                return_entropy=with_entropy,
            )
            if (with_values or with_hidden) and hidden is None:
                hidden = self.hidden_states(input_ids, attention_mask)
        lp, ent = (res if with_entropy else (res, None))
        out = PolicyOutput(logprobs=_shift_in(lp), entropy=None if ent is None else _shift_in(ent))
        if with_values:
            out.values = self.values_from_hidden(hidden)
        if with_hidden:
            out.hidden = hidden
        return out

    def token_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, *, with_entropy: bool = False, temperature: float = 1.0,
        labels: Tensor | None = None,
    ):
        """log p(input_ids[t] | input_ids[<t]) ``[B, T]`` float32, float64 for a float64 model (entry 0 and
        non-predicted tokens 0),
        plus the entropy ``[B, T]`` of the distribution at each position when ``with_entropy``."""
        out = self.forward(input_ids, attention_mask, labels=labels, with_entropy=with_entropy, temperature=temperature)
        return (out.logprobs, out.entropy) if with_entropy else out.logprobs

    def has_reference(self, reference_model=None) -> bool:
        return reference_model is not None or self.reference_model is not None or _is_peft(self.model)

    @torch.no_grad()
    def reference_logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, *, reference_model=None, temperature: float = 1.0,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Reference log-probs ``[B, T]`` without gradients: ``reference_model`` (argument, else the
        one given at construction); else, for a peft model, the same model with adapters disabled."""
        ref = reference_model if reference_model is not None else self.reference_model
        if ref is not None:
            ref_policy = ref if isinstance(ref, PolicyModel) else PolicyModel(ref)
            dev = _device_of(ref_policy.model)
            lp = ref_policy.token_logprobs(
                input_ids.to(dev), attention_mask.to(dev), temperature=temperature,
                labels=None if labels is None else labels.to(dev),
            )
            return lp.to(input_ids.device)
        if _is_peft(self.model):
            with self.model.disable_adapter():
                return self.token_logprobs(input_ids, attention_mask, temperature=temperature, labels=labels)
        raise ValueError(
            "this loss needs reference log-probs, but the policy has no reference: pass reference_model=<model>, "
            "build PolicyModel(model, reference_model=...), or use a LoRA (peft) policy, whose reference is the "
            "same model with adapters disabled (or set beta=0 where the loss allows it)"
        )

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        if self.value_head is None:
            raise ValueError("this policy has no value head: build PolicyModel(model, value_head=ValueHead(hidden_size))")
        return _shift_in(self.value_head(hidden[:, :-1]))

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """V(input_ids[<t]) ``[B, T]`` float32 (float64 in a float64 run) from the value head (entry 0 is 0)."""
        if self.value_head is None:
            self.values_from_hidden(None)  # raises the explanation
        return self.values_from_hidden(self.hidden_states(input_ids, attention_mask))

    def sequence_rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scalar reward ``[B]`` float32 (float64 in a float64 run): the reward head at the last non-padding token."""
        if self.reward_head is None:
            raise ValueError(
                "this policy has no reward head: build PolicyModel(model, reward_head=RewardHead(hidden_size))"
            )
        hidden = self.hidden_states(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self.reward_head(last)


def _shift_in(x: Tensor) -> Tensor:
    """``[B, T−1]`` (about positions 1..T−1) → ``[B, T]`` with a 0 in front."""
    return torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def as_policy(model, *, reference_model=None) -> PolicyModel:
    """A :class:`PolicyModel` for ``model`` (returned as is if it already is one)."""
    if isinstance(model, PolicyModel):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a PolicyModel or a Hugging Face causal LM (nn.Module), got {type(model).__name__}")
    return PolicyModel(model, reference_model=reference_model)

"""``patch(model)`` / ``unpatch(model)``: any Hugging Face causal LM computes ``model(..., labels=...)``'s loss through
the fused hidden-state × LM-head path of :func:`signalrl.ops.linear_token_logprobs`.

How it works, for every architecture alike (no per-model table): the instance's ``forward`` is replaced by a
wrapper (the class and every other instance are untouched). A call *with* ``labels`` runs the model's own forward
*without* labels while the output layer (``get_output_embeddings()``, a plain ``nn.Linear``) is briefly swapped, on
the instance, for a capture that records its input — the final hidden states, after whatever the model does before
its head (final norm, ``logits_to_keep`` slicing) — and returns a ``[..., 1]`` tensor of ones instead of logits (on
the first call the forward is checked to hand it back untouched: no scaling or soft-capping after the head). The
loss is then ``ForCausalLMLoss``'s, computed from those hidden states and the head's weight:

    shift_labels = pad(labels, (0, 1), value=ignore_index)[..., 1:]      (or the ``shift_labels`` passed)
    loss         = Σ −log p(shift_labels) / (num_items_in_batch, else the number of non-ignored labels)

in float32, as the stock loss (``logits.float()``) is. Everything else is the model's own output object (cache,
hidden states, attentions, MoE ``aux_loss`` added with ``router_aux_loss_coef`` as the stock forward does), with
``logits=None`` unless the caller asks for them (``patch(model, return_logits=True)``, or ``return_logits=True``
per call). A call without ``labels`` (generation, evaluation without labels) is the stock forward, unchanged.

The output layer's ``forward`` is swapped only for the duration of the call: a patched model must not run
forwards from two threads at once. A call that already carries TRL's ``fused_lm_head=True`` passes through.

A model the fused path cannot reproduce (final-logit soft-capping, logit scaling, an output layer that is not a
plain ``nn.Linear`` — e.g. a LoRA-wrapped head —, a quantized head, a loss function other than ``ForCausalLMLoss``)
keeps its stock path, with one :class:`~signalrl.losses.FusedPathWarning` per model.
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..losses.model import FusedPathWarning, PolicyModel

__all__ = ["FusedPathWarning", "is_patched", "patch", "unpatch"]

_STATE = "_signalrl_patch"
_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class _PatchState:
    """Kept in the patched instance's ``__dict__``; read by the wrapper through ``self`` (so ``copy.deepcopy`` of a
    patched model gives a patched copy that computes with its own weights)."""

    previous: Any  # the instance-level ``forward`` that was there before (None: the class's)
    return_logits: bool = False
    active: bool = True
    verified: bool = False  # the forward was seen to return the output layer's result untouched
    reason: str | None = None  # set when the run-time check failed: the stock path from then on


# --- finding the pieces ------------------------------------------------------------------------


def _causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM under a peft wrapper (the module whose ``forward`` every wrapper ends up calling)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch(model): expected a Hugging Face causal LM (nn.Module), got {type(model).__name__}")
    if hasattr(model, "get_base_model") and hasattr(model, "disable_adapter"):
        return model.get_base_model()
    return model


def _loss_reason(model: nn.Module) -> str | None:
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - very old transformers: the loss is inlined in forward
        return None
    fn = model.__dict__.get("_loss_function")
    if fn is None:
        loss_type = getattr(model, "loss_type", None)
        fn = LOSS_MAPPING.get(loss_type, ForCausalLMLoss) if loss_type else ForCausalLMLoss
    if fn is not ForCausalLMLoss:
        return f"its loss_function is {getattr(fn, '__name__', type(fn).__name__)}, not ForCausalLMLoss"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused path cannot reproduce ``model``'s loss (None if it can): the checks of
    :meth:`signalrl.losses.PolicyModel.fused_unsupported_reason` (head type, logit settings of the config and its
    text config) and the loss function. (At run time :func:`patch` also checks, once per model, that the forward returns the output layer's
    result untouched.)"""
    target = _causal_lm(model)
    if not callable(getattr(target, "get_output_embeddings", None)) or target.get_output_embeddings() is None:
        return "it has no output embeddings (get_output_embeddings() is None)"
    return PolicyModel(target).fused_unsupported_reason() or _loss_reason(target)


def _warn_once(model: nn.Module, reason: str, what: str = "keeps its stock loss path") -> None:
    if model in _warned:
        return
    _warned.add(model)
    warnings.warn(
        f"signalrl.patch: {type(model).__name__}: {reason}; it {what} (full [B, T, V] logits: correct, but uses "
        "more memory)",
        FusedPathWarning,
        stacklevel=4,
    )


# --- the wrapper -------------------------------------------------------------------------------


def _make_forward(cls_forward):
    # ``functools.wraps`` keeps the original signature visible to ``inspect.signature``: ``generate`` validates its
    # kwargs against it and ``Trainer`` reads it to decide whether to pass ``num_items_in_batch``.
    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    forward.__signalrl_patched__ = True
    return forward


def _original(self) -> Any:
    state: _PatchState = self.__dict__[_STATE]
    return state.previous if state.previous is not None else types.MethodType(type(self).forward, self)


def _bind(fn, args, kwargs) -> dict:
    """All arguments as keywords (positional ones named by ``fn``'s signature)."""
    if not args:
        return dict(kwargs)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise TypeError(f"forward() takes {len(params)} positional arguments but {len(args)} were given")
    out = {p.name: a for p, a in zip(params, args)}
    dup = set(out) & set(kwargs)
    if dup:
        raise TypeError(f"forward() got multiple values for argument {sorted(dup)[0]!r}")
    out.update(kwargs)
    return out


def _patched_forward(self, *args, **kwargs):
    state: _PatchState = self.__dict__.get(_STATE)
    original = _original(self)
    if state is None or not state.active:
        return original(*args, **kwargs)
    kw = _bind(original, args, kwargs)
    return_logits = kw.pop("return_logits", None)
    stock_kw = dict(kw)
    return_logits = state.return_logits if return_logits is None else bool(return_logits)
    labels = kw.get("labels")
    if labels is None or kw.get("fused_lm_head"):  # no loss asked (or TRL's own fused head): untouched
        return original(**kw)
    reason = state.reason or unsupported_reason(self)
    if reason is not None:
        _warn_once(self, reason)
        return original(**kw)

    labels = kw.pop("labels")
    shift_labels = kw.pop("shift_labels", None)
    num_items_in_batch = kw.pop("num_items_in_batch", None)
    ignore_index = kw.pop("ignore_index", -100)
    return_dict = kw.pop("return_dict", None)

    head = self.get_output_embeddings()
    captured: list[Tensor] = []
    had_own = "forward" in head.__dict__
    own = head.__dict__.get("forward")
    head_forward = head.forward

    probe: list[Tensor] = []

    def capture(hidden, *a, **k):
        captured.append(hidden)
        if return_logits:
            return head_forward(hidden, *a, **k)
        # a [..., 1] tensor of ones in place of the logits: what the forward returns shows whether it changes the
        # logits after the head (scaling, soft-capping), which the fused loss would not reproduce
        probe.append(hidden.new_ones(*hidden.shape[:-1], 1))
        return probe[-1]

    head.forward = capture
    try:
        out = original(**kw, return_dict=True)
    finally:
        if had_own:
            head.forward = own
        else:
            del head.forward

    if len(captured) != 1 or not is_dataclass(out) or "loss" not in {f.name for f in fields(out)}:
        # the model does not call its output layer exactly once per forward: run the stock path instead
        _warn_once(self, f"its forward called the output layer {len(captured)} times", "falls back to the stock path")
        return original(**stock_kw)

    if probe and not state.verified:
        # once per model (a host sync): the forward must hand the head's output back untouched (a dtype cast is fine)
        got = getattr(out, "logits", None)
        if got is not probe[0]:
            if not (torch.is_tensor(got) and got.shape == probe[0].shape and bool((got == 1).all())):
                state.reason = "its forward changes the logits after the output layer"
                _warn_once(self, state.reason)
                return original(**stock_kw)
        state.verified = True

    loss = causal_lm_loss(
        captured[0], head.weight, labels, bias=head.bias, shift_labels=shift_labels,
        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
    )
    aux = getattr(out, "aux_loss", None)
    if aux is not None:  # MoE: the stock forward adds the weighted load-balancing loss when labels are given
        coef = getattr(self, "router_aux_loss_coef", None)
        if coef is None:
            coef = getattr(getattr(self, "config", None), "router_aux_loss_coef", 0.0)
        loss = loss + coef * aux.to(loss.device)
    rest = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    result = type(out)(loss=loss, logits=out.logits if return_logits else None, **rest)
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return result.to_tuple()
    return result


def causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` from the head's input instead of its logits (no ``[N, V]`` logits).

    ``hidden``: the output layer's input ``[B, T, H]`` (or any ``[..., H]`` whose rows are the logits' rows);
    ``labels`` ``[B, T]`` are shifted left by one (``ignore_index`` appended) unless ``shift_labels`` is given;
    the rows of ``hidden`` and of the (shifted) labels must match one to one, as the logits' must in the stock loss.
    Returns the float32 mean over non-ignored labels, or the sum divided by ``num_items_in_batch`` when given.
    """
    H = hidden.shape[-1]
    if shift_labels is None:
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(labels.shape):
            # the last position's target is always ignore_index: leave it out instead of scoring it
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    else:
        targets = shift_labels
    h = hidden.reshape(-1, H)
    if h.device != weight.device:
        h = h.to(weight.device)
    if h.dtype != weight.dtype:  # e.g. autocast: score in the (wider) weight dtype
        h = h.to(weight.dtype)
    t = targets.reshape(-1).to(h.device)
    if t.shape[0] != h.shape[0]:
        raise ValueError(
            f"labels: {t.shape[0]} (shifted) labels for {h.shape[0]} positions of the output layer; with "
            "logits_to_keep the labels (or shift_labels) must cover exactly the kept positions, as in the stock loss"
        )
    with torch.autocast(h.device.type, enabled=False):
        logp = ops.linear_token_logprobs(h, weight, t, bias=bias, ignore_index=ignore_index)
    nll = -logp.sum(dtype=torch.float32) if logp.dtype != torch.float64 else -logp.sum()
    if num_items_in_batch is None:
        loss = nll / (t != ignore_index).sum()  # 0/0 = NaN for an all-ignored batch, like cross_entropy's mean
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(nll.device)
        loss = nll / num_items_in_batch
    return loss.float()


# --- public calls ------------------------------------------------------------------------------


def patch(model: nn.Module, *, return_logits: bool = False) -> nn.Module:
    """Make ``model(input_ids, labels=...)`` compute its loss through Signal's fused hidden-state × LM-head op.

    ``model``: any ``AutoModelForCausalLM`` instance, plain or peft-wrapped (the causal LM under the wrapper is
    patched, so every wrapper's forward goes through it). Only this instance changes. Calls without ``labels``
    are the stock forward. ``return_logits``: also return ``outputs.logits`` on loss calls (computed by the stock
    head; default None, which saves the ``[B, T, V]`` logits). Idempotent (a second call only updates
    ``return_logits``); :func:`unpatch` restores the original forward. A model whose output layer the fused path
    cannot reproduce keeps its stock path, with one :class:`FusedPathWarning`. Returns ``model``.
    """
    target = _causal_lm(model)
    state = target.__dict__.get(_STATE)
    if state is not None:  # already patched (or a pass-through layer left by unpatch): (re)activate it
        state.return_logits = bool(return_logits)
        state.active = True
        return model
    reason = unsupported_reason(target)
    if reason is not None:
        _warn_once(target, reason)
        return model
    previous = target.__dict__.get("forward")
    target.__dict__[_STATE] = _PatchState(previous=previous, return_logits=bool(return_logits))
    wrapped = previous.__func__ if isinstance(previous, types.MethodType) else type(target).forward
    target.forward = types.MethodType(_make_forward(wrapped), target)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the instance's ``forward`` is again exactly what it was before (for an instance without
    its own ``forward``, the class's). A no-op on a model that is not patched. If something wrapped the forward
    after :func:`patch` (another library), that wrapper is kept and the Signal layer under it becomes a plain
    pass-through. Returns ``model``."""
    target = _causal_lm(model)
    state = target.__dict__.get(_STATE)
    if state is None:
        return model
    current = target.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), "__signalrl_patched__", False):
        if state.previous is None:
            del target.forward
        else:
            target.forward = state.previous
        del target.__dict__[_STATE]
    else:
        state.active = False  # wrapped again after patch(): become a pass-through under the newer wrapper
        warnings.warn(
            f"signalrl.unpatch: {type(target).__name__}.forward was wrapped again after patch(); the Signal layer "
            "is now a pass-through under that wrapper", RuntimeWarning, stacklevel=2,
        )
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the causal LM under its peft wrapper) computes its loss through :func:`patch`."""
    state = _causal_lm(model).__dict__.get(_STATE)
    return state is not None and state.active

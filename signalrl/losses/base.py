"""What every loss shares: the result type, batch specifications, keyword handling, the stability
monitor and :class:`LossSpec`, the object the registry hands out and users call.

A loss is a :class:`LossSpec`: a name, a batch specification (:class:`Field` per key), keyword
defaults with checks, flags saying which heads / reference it needs, and a ``compute`` function
``compute(policy, batch, kwargs) -> Computed``. Calling the spec validates the keywords and the
batch, runs ``compute``, turns every metric into a Python float with one host sync, runs the
stability monitor, and raises :class:`NonFiniteLossError` if the loss is not finite — before the
caller can run ``backward``.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ._values import check_values, model_limits

# --- result ---------------------------------------------------------------------------------


@dataclass
class LossResult:
    """``loss``: 0-d tensor carrying the graph; ``metrics``: Python floats (includes ``"loss"``);
    ``warnings``: short sentences from the stability monitor."""

    loss: Tensor
    metrics: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def __iter__(self):  # ``loss, metrics = result`` also works
        yield self.loss
        yield self.metrics


@dataclass
class Computed:
    """What a loss's ``compute`` returns: the loss, metric tensors (0-d, detached) or floats, and the
    monitor checks that do not apply to this call (e.g. ``"clip_fraction"`` when the ratio is 1 by
    construction). Metrics whose name starts with ``_`` are internal: used by the monitor, not returned."""

    loss: Tensor
    metrics: dict[str, Tensor | float]
    skip_monitors: frozenset[str] = frozenset()
    notes_if: dict[str, str] = field(default_factory=dict)  # internal metric name → warning if nonzero


class NonFiniteLossError(FloatingPointError):
    """The loss came out NaN or infinite; raised before any gradient is accumulated."""


# --- batch specification --------------------------------------------------------------------

Shape = tuple  # of str symbols ("B", "T", ...) or ints

_KINDS = {
    "int": "an integer tensor (token ids)",
    "float": "a floating-point tensor",
    "mask": "a bool, integer or floating 0/1 tensor",
}


@dataclass(frozen=True)
class Field:
    """One batch key: ``shape`` is a pattern such as ``("B", "T")`` (or a tuple of alternative
    patterns), ``kind`` one of ``"int"``, ``"float"``, ``"mask"``."""

    key: str
    shape: Shape | tuple[Shape, ...]
    kind: str
    required: bool = True
    doc: str = ""

    def patterns(self) -> tuple[Shape, ...]:
        if self.shape and isinstance(self.shape[0], tuple):
            return self.shape  # type: ignore[return-value]
        return (self.shape,)

    def describe(self) -> str:
        pats = " or ".join(_fmt_pattern(p) for p in self.patterns())
        return f"{self.key} {pats} ({self.kind}{'' if self.required else ', optional'})"


def _fmt_pattern(p: Shape) -> str:
    return "[" + ", ".join(str(s) for s in p) + "]"


def _kind_ok(t: Tensor, kind: str) -> bool:
    if kind == "int":
        return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    if kind == "float":
        return t.is_floating_point()
    return not t.is_complex()


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def validate_batch(loss_name: str, fields: tuple[Field, ...], batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """Check ``batch`` against ``fields``; returns a plain dict of tensors (lists are converted).

    Errors name the key and give expected vs received shape / dtype / device. Symbols bind on first
    use, in field order, so ``[B, T]`` everywhere means the same B and T.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"{loss_name}: batch must be a dict of tensors, got {type(batch).__name__}")
    known = {f.key: f for f in fields}
    for key in batch:
        if key not in known:
            raise ValueError(
                f"{loss_name}: unknown batch key {key!r}.{_suggest(key, known)} "
                f"Accepted keys: {', '.join(f.describe() for f in fields)}"
            )
    dims: dict[str, int] = {}
    out: dict[str, Tensor] = {}
    device = None
    for f in fields:
        if f.key not in batch or batch[f.key] is None:
            if f.required:
                raise ValueError(
                    f"{loss_name}: batch is missing required key {f.key!r} "
                    f"(expected {' or '.join(_fmt_pattern(p) for p in f.patterns())}, {_KINDS[f.kind]}). "
                    f"Received keys: {sorted(batch)}"
                )
            continue
        value = batch[f.key]
        if not isinstance(value, Tensor):
            try:
                value = torch.as_tensor(value)
            except Exception as exc:  # ragged lists and the like
                raise TypeError(
                    f"{loss_name}: batch[{f.key!r}] must be a tensor ({_KINDS[f.kind]}), "
                    f"got {type(value).__name__} that torch.as_tensor cannot convert ({exc})"
                ) from None
        if not _kind_ok(value, f.kind):
            raise TypeError(f"{loss_name}: batch[{f.key!r}] must be {_KINDS[f.kind]}, received dtype {value.dtype}")
        if device is None:
            device = value.device
        elif value.device != device:
            raise ValueError(
                f"{loss_name}: batch[{f.key!r}] is on {value.device}, expected {device} like the keys before it"
            )
        errors = []
        for pat in f.patterns():
            trial = dict(dims)
            err = _match(pat, tuple(value.shape), trial)
            if err is None:
                dims = trial
                break
            errors.append(err)
        else:
            raise ValueError(f"{loss_name}: batch[{f.key!r}]: {' or '.join(errors)}, received {list(value.shape)}")
        out[f.key] = value
    return out


def _match(pat: Shape, shape: tuple[int, ...], dims: dict[str, int]) -> str | None:
    def expected() -> str:
        parts = []
        for s in pat:
            parts.append(f"{s}={dims[s]}" if isinstance(s, str) and s in dims else str(s))
        return "expected shape [" + ", ".join(parts) + "]"

    if len(pat) != len(shape):
        return expected()
    for s, n in zip(pat, shape):
        if isinstance(s, int):
            if s != n:
                return expected()
        elif s in dims:
            if dims[s] != n:
                return expected()
        else:
            dims[s] = n
    return None


# --- keyword arguments ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A keyword check: ``ok(value) -> bool`` and what is accepted, in words."""

    ok: Callable[[Any], bool]
    expected: str
    coerce: Callable[[Any], Any] = lambda v: v


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False, optional=False) -> Check:
    def ok(v):
        if v is None:
            return optional
        if not _is_num(v):
            return False
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return False
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return False
        return True

    lo_s = "" if lo is None else f"{'>' if lo_open else '≥'} {lo}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '≤'} {hi}"
    rng = " and ".join(s for s in (lo_s, hi_s) if s)
    desc = "a finite number" + (f" {rng}" if rng else "") + (" or None" if optional else "")
    return Check(ok, desc, lambda v: None if v is None else float(v))


def integer(lo: int | None = None, *, optional=False) -> Check:
    def ok(v):
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return lo is None or v >= lo

    desc = "an integer" + ("" if lo is None else f" ≥ {lo}") + (" or None" if optional else "")
    return Check(ok, desc, lambda v: None if v is None else int(v))


def boolean() -> Check:
    return Check(lambda v: isinstance(v, bool), "True or False")


def one_of(*options: str) -> Check:
    return Check(lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


def model_or_none() -> Check:
    # A name is accepted here so an engine can validate early; it must be resolved before the call.
    return Check(lambda v: v is None or isinstance(v, (nn.Module, str)), "a model (nn.Module), a name, or None")


def resolve_kwargs(loss_name: str, defaults: Mapping[str, Any], checks: Mapping[str, Check], kwargs) -> dict:
    """Defaults overlaid with ``kwargs``; an unknown keyword or a bad value is a ValueError."""
    kwargs = dict(kwargs or {})
    for key in kwargs:
        if key not in defaults:
            raise ValueError(
                f"{loss_name}: unknown keyword argument {key!r}.{_suggest(key, defaults)} "
                f"Accepted: {', '.join(f'{k}={defaults[k]!r}' for k in defaults)}"
            )
    out = dict(defaults)
    for key, value in kwargs.items():
        check = checks.get(key)
        if check is not None:
            if not check.ok(value):
                raise ValueError(f"{loss_name}: {key} must be {check.expected}, got {value!r}")
            value = check.coerce(value)
        out[key] = value
    return out


# --- stability monitor -----------------------------------------------------------------------

KL_WARN = 0.05
CLIP_FRACTION_RANGE = (0.1, 0.3)
EXPLAINED_VARIANCE_WARN = 0.5


def stability_warnings(metrics: Mapping[str, float], skip: frozenset[str] = frozenset()) -> list[str]:
    """Short sentences from the tuning guide's thresholds (only for metrics present and not skipped)."""
    out = []
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    for k in bad:
        out.append(f"{k} is {metrics[k]} (non-finite): check the learning rate, the inputs and the log-probs.")
    kl = metrics.get("kl_divergence")
    if kl is not None and "kl_divergence" not in skip and math.isfinite(kl) and kl > KL_WARN:
        out.append(
            f"KL divergence {kl:.4g} > {KL_WARN}: the policy is moving away from the reference quickly; "
            "lower the learning rate or raise beta."
        )
    cf = metrics.get("clip_fraction")
    lo, hi = CLIP_FRACTION_RANGE
    if cf is not None and "clip_fraction" not in skip and math.isfinite(cf) and not (lo <= cf <= hi):
        hint = "updates are too large; lower the learning rate" if cf > hi else "updates are small; the step size may be too low"
        out.append(f"clip fraction {cf:.3g} outside {lo}–{hi}: {hint}.")
    ev = metrics.get("explained_variance")
    if ev is not None and "explained_variance" not in skip and math.isfinite(ev) and ev < EXPLAINED_VARIANCE_WARN:
        out.append(
            f"explained variance {ev:.3g} < {EXPLAINED_VARIANCE_WARN}: the value function predicts the returns "
            "poorly; train it longer or raise value_loss_coef."
        )
    return out


def to_floats(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """All metric tensors to Python floats with a single device→host transfer."""
    names = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if names:
        stacked = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in names])
        for k, v in zip(names, stacked.cpu().tolist()):
            out[k] = v
    return {k: out[k] for k in metrics}


# --- the spec --------------------------------------------------------------------------------


@dataclass(eq=False)
class LossSpec:
    """A named loss: batch spec, defaults and checks, what it needs, and its compute function.

    ``spec(policy_or_model, batch, **kwargs) -> LossResult``. ``policy_or_model`` is a
    :class:`~signalrl.losses.model.PolicyModel` or a bare Hugging Face causal LM (wrapped on the fly,
    with ``reference_model`` from the kwargs).
    """

    name: str
    batch: tuple[Field, ...]
    defaults: dict[str, Any]
    compute: Callable[[Any, dict[str, Tensor], dict[str, Any]], Computed]
    checks: dict[str, Check] = field(default_factory=dict)
    needs_value_head: bool = False
    needs_reward_head: bool = False
    uses_reference: bool = False
    min_tokens: int = 2  # per sequence: a first token and one predicted from it
    metric_names: tuple[str, ...] = ()
    summary: str = ""

    def resolve_kwargs(self, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return resolve_kwargs(self.name, self.defaults, self.checks, kwargs)

    def validate_batch(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return validate_batch(self.name, self.batch, batch)

    def __call__(self, policy, batch: Mapping[str, Any], **kwargs) -> LossResult:
        from .model import as_policy

        kw = self.resolve_kwargs(kwargs)
        if isinstance(kw.get("reference_model"), str):
            raise TypeError(
                f"{self.name}: reference_model={kw['reference_model']!r} is a name; pass the model object "
                "(the training engine resolves names before calling the loss)"
            )
        data = self.validate_batch(batch)
        policy = as_policy(policy)
        vocab, positions = model_limits(policy.base_model())
        check_values(self.name, self.batch, data, vocab_size=vocab, max_positions=positions,
                     min_tokens=self.min_tokens)
        computed = self.compute(policy, data, kw)
        metrics = dict(computed.metrics)
        metrics["loss"] = computed.loss.detach()
        floats = to_floats(metrics)
        warnings = [msg for key, msg in computed.notes_if.items() if floats.get(key, 0.0) != 0.0]
        warnings += stability_warnings({k: v for k, v in floats.items() if not k.startswith("_")}, computed.skip_monitors)
        if not math.isfinite(floats["loss"]):
            bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
            raise NonFiniteLossError(
                f"{self.name}: the loss is {floats['loss']} (non-finite metrics: {bad}); "
                "no gradient was accumulated. Check the learning rate and the batch (e.g. old_log_probs)."
            )
        public = {k: v for k, v in floats.items() if not k.startswith("_")}
        return LossResult(loss=computed.loss, metrics=public, warnings=warnings)

    def describe(self) -> str:
        keys = "\n".join(f"  {f.describe()}" + (f": {f.doc}" if f.doc else "") for f in self.batch)
        kws = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{self.name}: {self.summary}\nbatch:\n{keys}\nkwargs: {kws}\nmetrics: {', '.join(self.metric_names)}"

    def __repr__(self) -> str:
        return f"LossSpec({self.name!r})"


class LossModule(nn.Module):
    """Drop-in ``nn.Module`` form of a loss: ``Loss(**kwargs)(model, batch) -> LossResult``.

    Keywords are checked at construction. ``value_head`` / ``reward_head`` given here are
    registered as sub-modules (so ``loss.parameters()`` trains them) and attached to the policy;
    ``reference_model`` is kept out of the module tree (never trained, never in ``parameters()``).
    """

    spec: LossSpec

    def __init__(self, *, value_head: nn.Module | None = None, reward_head: nn.Module | None = None, **kwargs):
        super().__init__()
        self.kwargs = self.spec.resolve_kwargs(kwargs)
        self.value_head = value_head
        self.reward_head = reward_head

    def forward(self, model, batch: Mapping[str, Any]) -> LossResult:
        from .model import PolicyModel

        if isinstance(model, PolicyModel):
            policy = model
            if self.value_head is not None or self.reward_head is not None:
                policy = PolicyModel(
                    model.model,
                    reference_model=model.reference_model,
                    value_head=self.value_head if self.value_head is not None else model.value_head,
                    reward_head=self.reward_head if self.reward_head is not None else model.reward_head,
                )
        else:
            policy = PolicyModel(model, value_head=self.value_head, reward_head=self.reward_head)
        return self.spec(policy, batch, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if not isinstance(v, nn.Module))

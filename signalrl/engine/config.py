"""What ``create_run`` accepts: :class:`RunConfig`, its validation, and the learning-rate schedule it names."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from .models import DEFAULT_BASE_MODEL, resolve_dtype

OPTIMIZERS = ("adamw", "sgd", "adamw_8bit")
SCHEDULES = ("constant", "linear", "cosine")
HEADS = ("value", "reward")


@dataclass
class RunConfig:
    """Everything ``create_run`` accepts. ``lora_r=0`` means full fine-tuning.

    ``lora_target_modules=None`` targets every linear layer of the decoder (peft's ``"all-linear"``).
    ``lr_scheduler``: ``constant``, or ``linear``/``cosine`` decay to 0 at ``total_steps`` after
    ``warmup_steps`` of linear warm-up. ``value_head``/``reward_head``: ``None`` creates the head the first
    time a loss needs it, ``True`` at creation, ``False`` never (a loss that needs it then fails).
    ``checkpoint_every=N``: after every N-th optimizer step, save the run as checkpoint ``latest`` (a server
    keeps its own numbered checkpoints instead; see docs/server.md).
    """
    base_model: str = DEFAULT_BASE_MODEL
    lora_r: int = 32
    lora_alpha: float = 64
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str | None = None
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    value_head: bool | None = None
    reward_head: bool | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    name: str | None = None
    tensorboard: bool = False
    checkpoint_every: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field, what it expects and what it got."""
        for f in fields(self):
            _CHECKS[f.name](f.name, getattr(self, f.name))
        if self.lr_scheduler != "constant" and self.total_steps is None:
            raise ValueError(f"total_steps: expected an int > 0 with lr_scheduler={self.lr_scheduler!r}, got None")
        resolve_dtype(self.dtype)
        check_device(self.device)


def _fail(arg: str, expected: str, got: Any, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{arg}: expected {expected}, got {got!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(lo: int, hi: int | None = None, *, optional: bool = False, what: str = "") -> Callable[[str, Any], None]:
    expected = f"an int >= {lo}" + (f" and < {hi}" if hi is not None else "") + (" or None" if optional else "") \
        + (f" ({what})" if what else "")

    def check(arg: str, v: Any) -> None:
        if v is None and optional:
            return
        if not _is_int(v):
            _fail(arg, expected, v, TypeError)
        if v < lo or (hi is not None and v >= hi):
            _fail(arg, expected, v)
    return check


def _num(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         optional: bool = False) -> Callable[[str, Any], None]:
    lo_s = f"{'>' if lo_open else '>='} {lo}"
    hi_s = "" if hi is None else f" and {'<' if hi_open else '<='} {hi}"
    expected = f"a finite number {lo_s}{hi_s}" + (" or None" if optional else "")

    def check(arg: str, v: Any) -> None:
        if v is None and optional:
            return
        if not _is_num(v):
            _fail(arg, expected, v, TypeError)
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and (v > hi or (hi_open and v == hi))):
            _fail(arg, expected, v)
    return check


def _one_of(options: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(arg: str, v: Any) -> None:
        if v not in options:
            _fail(arg, f"one of {options}", v)
    return check


def _string(*, optional: bool = False, nonempty: bool = True) -> Callable[[str, Any], None]:
    expected = ("a non-empty string" if nonempty else "a string") + (" or None" if optional else "")

    def check(arg: str, v: Any) -> None:
        if v is None and optional:
            return
        if not isinstance(v, str):
            _fail(arg, expected, v, TypeError)
        if (nonempty and not v) or "\x00" in v:
            _fail(arg, expected + " without NUL bytes", v)
    return check


def _tristate(arg: str, v: Any) -> None:
    if v is not None and not isinstance(v, bool):
        _fail(arg, "True, False or None", v, TypeError)


def _boolean(arg: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(arg, "True or False", v, TypeError)


def _target_modules(arg: str, v: Any) -> None:
    if v is None or (isinstance(v, str) and v):
        return
    if isinstance(v, (list, tuple)) and v and all(isinstance(m, str) and m for m in v):
        return
    _fail(arg, "None, a module-name string or a non-empty list of module-name strings", v, TypeError)


def _betas(arg: str, v: Any) -> None:
    expected = "a pair (beta1, beta2) of numbers in [0, 1)"
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_num(b) for b in v):
        _fail(arg, expected, v, TypeError)
    if not all(0.0 <= b < 1.0 for b in v):
        _fail(arg, expected, v)


def _dtype(arg: str, v: Any) -> None:
    resolve_dtype(v)


def _device(arg: str, v: Any) -> None:
    if v is not None and not isinstance(v, str):
        _fail(arg, "None or a device string such as 'cpu' or 'cuda:0'", v, TypeError)


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "base_model": _string(),
    "lora_r": _int(0, what="0 = full fine-tuning"),
    "lora_alpha": _num(0.0, lo_open=True),
    "lora_dropout": _num(0.0, 1.0, hi_open=True),
    "lora_target_modules": _target_modules,
    "learning_rate": _num(0.0, lo_open=True),
    "optimizer": _one_of(OPTIMIZERS),
    "weight_decay": _num(0.0),
    "adam_betas": _betas,
    "adam_eps": _num(0.0, lo_open=True),
    "momentum": _num(0.0, 1.0, hi_open=True),
    "max_grad_norm": _num(0.0, lo_open=True, optional=True),
    "lr_scheduler": _one_of(SCHEDULES),
    "warmup_steps": _int(0),
    "total_steps": _int(1, optional=True),
    "value_head": _tristate,
    "reward_head": _tristate,
    "seed": _int(0, 2**63),
    "dtype": _dtype,
    "device": _device,
    "name": _string(optional=True),
    "tensorboard": _boolean,
    "checkpoint_every": _int(1, optional=True),
}


def check_device(device: str | None) -> None:
    """A device string that names a device this machine has (``None``: the default device)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device: expected a device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device: expected a device this machine has ('cpu'), got {device!r}: no CUDA device "
                             "is available")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device: expected 'cuda:0'..'cuda:{n - 1}', got {device!r}")
        return
    raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")


def _lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    warm, total, kind = cfg.warmup_steps, cfg.total_steps, cfg.lr_scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f

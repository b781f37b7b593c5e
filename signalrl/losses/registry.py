"""Losses by name: ``get_loss(name) -> LossSpec``, ``list_losses()``, ``register_loss(spec)``."""
from __future__ import annotations

import difflib
import importlib

from .base import LossSpec

_REGISTRY: dict[str, LossSpec] = {}
_BUILTIN_MODULES = ("ppo", "dpo", "grpo", "importance_sampling", "reward_modeling", "causal_lm")


def register_loss(spec: LossSpec, *, replace: bool = False) -> LossSpec:
    """Add ``spec`` under ``spec.name`` (a name already taken is an error unless ``replace``)."""
    if not isinstance(spec, LossSpec):
        raise TypeError(f"register_loss: expected a LossSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"register_loss: a loss named {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def list_losses() -> list[str]:
    """Registered loss names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` called ``name``; an unknown name is a ValueError listing the known ones."""
    _load_builtins()
    if isinstance(name, LossSpec):
        return name
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss_fn {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return spec

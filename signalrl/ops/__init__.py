"""The op layer: validated public functions that dispatch to Triton, native C++ or the reference.

Ops: ``token_logprobs``, ``linear_token_logprobs``, ``kl_penalty``, ``clipped_surrogate``,
``value_loss``, ``gae``, ``linear_ppo_loss``, ``masked_mean``, ``masked_whiten``, ``group_normalize``.
Control: ``use_backend``, ``backend_for``, ``available_backends``, ``check_mode``, ``SignalCheckError``.
Op modules are imported on first use, so ``import signalrl.ops`` stays cheap.
"""
from __future__ import annotations

import importlib

from ._aggregate import token_weights
from ._backend import BACKENDS, available_backends, backend_for, forced_backend, use_backend
from ._check import SignalCheckError, check_enabled, check_mode

_OP_MODULES = {
    "token_logprobs": "logprobs",
    "linear_token_logprobs": "logprobs",
    "kl_penalty": "kl",
    "clipped_surrogate": "ppo",
    "value_loss": "ppo",
    "gae": "gae",
    "linear_ppo_loss": "linear_ppo",
    "masked_mean": "stats",
    "masked_whiten": "stats",
    "group_normalize": "stats",
}

__all__ = [
    "BACKENDS", "SignalCheckError", "available_backends", "backend_for", "check_enabled", "check_mode",
    "forced_backend", "token_weights", "use_backend", *_OP_MODULES,
]


def __getattr__(name: str):
    module = _OP_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'signalrl.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(__all__)

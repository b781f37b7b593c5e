"""Frozen models: a small LRU cache of the reference models of KL-regularised losses (a run's ``reference_model``),
shared by every run of an engine.

"Reference" here is the frozen *model* a policy is compared with; :mod:`signalrl.reference` (the ground-truth math
of the ops) and the ``reference`` backend (``SIGNAL_BACKEND=reference``, which runs that math) are the other two
meanings of the word in Signal.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import torch


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter requires grad."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ReferenceCache:
    """``get(name, dtype, device, seed)`` loads ``name`` once and keeps at most ``capacity`` models.

    The least recently used model is dropped when a new one would exceed the capacity. Models come
    back frozen (eval mode, ``requires_grad=False``); callers must not train them.
    """

    def __init__(self, loader: Callable[..., Any], capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        self._loader = loader
        self.capacity = capacity
        self._models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, name: str, *, dtype: Any, device: Any, seed: int = 0) -> torch.nn.Module:
        key = (name, str(dtype), str(device), seed)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key]
        model = freeze(self._loader(name, dtype=dtype, device=device, seed=seed))
        with self._lock:
            self.misses += 1
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        return model

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

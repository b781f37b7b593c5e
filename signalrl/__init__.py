"""Signal: fused kernels and an RL training API for large language models.

- :mod:`signalrl.ops` — fused ops (Triton / native C++ / reference) with check mode;
- :mod:`signalrl.reference` — the ground truth in plain PyTorch;
- :mod:`signalrl.losses` — the named loss functions (``enhanced_ppo``, ``dpo``, ``grpo``, …);
- :mod:`signalrl.client` — ``AsyncSignalClient`` / ``SignalClient`` and the training API;
- :mod:`signalrl.integrations` — ``signalrl.patch(model)`` / ``unpatch``, module losses, TRL trainers.

``losses``, ``client`` and ``integrations`` (which import transformers) load on first access.
"""
import importlib

from . import ops, reference

__version__ = "0.1.0"
_CLIENT_NAMES = ("AsyncSignalClient", "SignalClient", "TrainingClient", "FutureGroup")
_INTEGRATION_NAMES = ("patch", "unpatch")  # signalrl.patch(model): fused loss for any HF causal LM
__all__ = ["client", "integrations", "losses", "ops", "reference", "__version__", *_CLIENT_NAMES, *_INTEGRATION_NAMES]


def __getattr__(name: str):
    if name in ("losses", "client", "integrations"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module(f"{__name__}.client"), name)
    if name in _INTEGRATION_NAMES:
        return getattr(importlib.import_module(f"{__name__}.integrations"), name)
    raise AttributeError(f"module 'signalrl' has no attribute {name!r}")

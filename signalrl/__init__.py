"""Signal: fused kernels and an RL training API for large language models.

- :mod:`signalrl.ops` — fused ops (Triton / native C++ / reference) with check mode;
- :mod:`signalrl.reference` — the ground truth in plain PyTorch;
- :mod:`signalrl.losses` — the named loss functions (``enhanced_ppo``, ``dpo``, ``grpo``, …);
- :mod:`signalrl.client` — ``AsyncSignalClient`` / ``SignalClient`` and the training API.
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402

__all__ = ["ops", "reference", "__version__"]

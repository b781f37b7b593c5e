"""Drop-in use of Signal's fused kernels in other people's training loops.

- :func:`patch` / :func:`unpatch`: one call makes any Hugging Face causal LM (plain or peft-wrapped) compute
  ``model(input_ids, labels=...)``'s loss through the fused hidden-state × LM-head op (no ``[B, T, V]`` logits);
- :class:`LinearCrossEntropyLoss`, :class:`LinearGRPOLoss`, :class:`LinearDPOLoss`: ``nn.Module`` losses from
  hidden states and the head weight, for hand-written loops;
- ``SignalGRPOTrainer``, ``SignalDPOTrainer``, ``SignalSFTTrainer`` (:mod:`signalrl.integrations.trainers`, needs
  ``trl``): TRL's trainers with Signal's kernels.

Dependencies point one way: this package uses :mod:`signalrl.losses` and :mod:`signalrl.ops`, nothing above them.
"""
import importlib

from .hf import is_patched, patch, unpatch
from .modules import LinearCrossEntropyLoss, LinearDPOLoss, LinearGRPOLoss

_TRAINERS = ("SignalDPOTrainer", "SignalGRPOTrainer", "SignalSFTTrainer")
__all__ = ["LinearCrossEntropyLoss", "LinearDPOLoss", "LinearGRPOLoss", "is_patched", "patch", "unpatch", *_TRAINERS]


def __getattr__(name: str):
    if name in _TRAINERS:  # trl is optional: import it only when a trainer is asked for
        return getattr(importlib.import_module(f"{__name__}.trainers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

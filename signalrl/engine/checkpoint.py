"""Atomic checkpoints of a run.

A checkpoint is a directory:

- ``weights.safetensors``: every trainable tensor of the run — the LoRA adapters (or all weights for
  full fine-tuning) under their ``named_parameters`` names, and the heads under ``heads.<name>.*``;
- ``optimizer.pt``, ``scheduler.pt``: ``state_dict()`` of each;
- ``rng.pt``: the CPU/CUDA/Python/NumPy generators and the run's sampling generator;
- ``state.json``: step, heads (in creation order), the run config and a format version.

It is written into a temporary sibling directory, flushed, and renamed into place, so a crash leaves
either the previous checkpoint or the new one, never a half-written one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_FILES = ("weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def capture_rng(sampling_generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sampling_generator is not None:
        state["sampling"] = sampling_generator.get_state()
    return state


def restore_rng(state: dict[str, Any], sampling_generator: torch.Generator | None) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampling_generator is not None and "sampling" in state:
        sampling_generator.set_state(state["sampling"])


def write_checkpoint(path: str, *, tensors: dict[str, torch.Tensor], optimizer: dict, scheduler: dict | None,
                     rng: dict, state: dict[str, Any]) -> str:
    """Write atomically to ``path`` (replacing an existing checkpoint there)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, "weights.safetensors"))
        torch.save(optimizer, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler, os.path.join(tmp, "scheduler.pt"))
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, **state}, f, indent=2, default=str)
        for name in _FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".old-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint(path: str, device: Any) -> dict[str, Any]:
    missing = [n for n in _FILES if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise ValueError(f"checkpoint {path!r} is incomplete or not a checkpoint: missing {missing}")
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path!r}: format_version {state.get('format_version')} "
                         f"is not the supported {FORMAT_VERSION}")
    return {
        "tensors": load_file(os.path.join(path, "weights.safetensors"), device=str(device)),
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=False),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), weights_only=False),
        "rng": torch.load(os.path.join(path, "rng.pt"), weights_only=False),
        "state": state,
    }

"""Per-request limits: a batch the device cannot hold is refused before any compute, with a named error.

The estimate is deliberately simple and errs high. For ``S`` sequences of ``T`` tokens through a decoder of
``L`` layers (hidden ``H``, MLP width ``I``, ``A`` attention heads, vocabulary ``V``) in a dtype of ``e`` bytes::

    bytes ≈ e · S·T · L · (8·H + 4·I)      activations kept for the backward pass
          + e · S · L · A · T²             attention probabilities (what an eager attention keeps)
          + 4 · S·T · V                    one float32 row of logits per token (sampling, fallback paths)

It counts the policy once; a reference model adds a forward pass without kept activations, well inside the
margin. The limit is ``Engine(max_request_bytes=...)``, else ``$SIGNAL_MAX_REQUEST_BYTES``, else half of the
memory of the machine (CPU) or of the first GPU.
"""
from __future__ import annotations

import os
from typing import Any

import torch

ENV = "SIGNAL_MAX_REQUEST_BYTES"


class RequestTooLargeError(ValueError):
    """A request's estimated memory exceeds the engine's ``max_request_bytes``."""


def device_memory_bytes() -> int:
    """Total memory of the first GPU if there is one, else of this machine."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def resolve_max_request_bytes(value: int | None) -> int:
    """``value`` if given, else ``$SIGNAL_MAX_REQUEST_BYTES``, else half the device memory."""
    where = "max_request_bytes"
    if value is None and os.environ.get(ENV):
        where, value = ENV, os.environ[ENV]
        try:
            value = int(float(value))
        except ValueError:
            raise ValueError(f"{ENV}: expected a number of bytes, got {os.environ[ENV]!r}") from None
    if value is None:
        return device_memory_bytes() // 2
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: expected an int > 0 (bytes), got {value!r}")
    return value


def _cfg(model_config: Any, *names: str, default: int = 0) -> int:
    for n in names:
        v = getattr(model_config, n, None)
        if isinstance(v, int):
            return v
    return default


def estimate_bytes(model_config: Any, sequences: int, length: int, element_size: int) -> int:
    """The module docstring's estimate for ``sequences`` × ``length`` tokens."""
    H = _cfg(model_config, "hidden_size", "n_embd", "d_model", default=1024)
    inter = _cfg(model_config, "intermediate_size", "n_inner", "ffn_dim", default=4 * H) or 4 * H
    layers = _cfg(model_config, "num_hidden_layers", "n_layer", "num_layers", default=12)
    heads = _cfg(model_config, "num_attention_heads", "n_head", default=max(1, H // 64))
    vocab = _cfg(model_config, "vocab_size", default=32000)
    tokens = sequences * length
    return (element_size * tokens * layers * (8 * H + 4 * inter)
            + element_size * sequences * layers * heads * length * length
            + 4 * tokens * vocab)


def batch_sequences(batch: dict[str, Any]) -> list[tuple[str, int, int]]:
    """``(key, sequences, length)`` for every group of sequences a prepared loss batch runs through the model."""
    out = []
    for key in ("input_ids", "chosen_input_ids", "rejected_input_ids"):
        t = batch.get(key)
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            out.append((key, int(t.shape[0]), int(t.shape[1])))
    p, r = batch.get("prompt_ids"), batch.get("response_ids")
    if isinstance(p, torch.Tensor) and isinstance(r, torch.Tensor) and p.dim() == 2 and r.dim() == 3:
        out.append(("prompt_ids + response_ids", int(r.shape[0] * r.shape[1]), int(p.shape[1] + r.shape[2])))
    return out


def check_request(model_config: Any, element_size: int, limit: int, groups: list[tuple[str, int, int]],
                  what: str = "batch_data") -> None:
    """Raise :class:`RequestTooLargeError` if ``groups`` (``(key, sequences, length)``) need more than ``limit``."""
    need = sum(estimate_bytes(model_config, s, n, element_size) for _, s, n in groups)
    if need > limit:
        shapes = ", ".join(f"{k}: {s} sequences × {n} tokens" for k, s, n in groups)
        raise RequestTooLargeError(
            f"{what}: expected a request within this engine's memory limit of {limit / 2**30:.2f} GiB, got one "
            f"estimated at {need / 2**30:.2f} GiB ({shapes}); split it into smaller batches (and accumulate "
            f"with several forward_backward calls before optim_step), or raise Engine(max_request_bytes=...) / "
            f"${ENV}")

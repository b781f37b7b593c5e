"""Argument checks for the public ops: errors name the argument, what was expected and what came.

They read only shapes, dtypes and devices (never tensor values), so they cost no host sync.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
MASK_DTYPES = (torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, x, *, dtypes: Sequence[torch.dtype] | None = None, min_dim: int | None = None,
           ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_names(dtypes)}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {x.device}")


def optional_mask(name: str, mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor | None:
    """Validate an optional 0/1 mask with ``ref``'s shape and device."""
    if mask is None:
        return None
    tensor(name, mask, dtypes=MASK_DTYPES)
    same_shape(name, mask, ref_name, ref)
    same_device(name, mask, ref_name, ref)
    return mask


def positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def optional_positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}: expected None or a positive number, got {value!r}")
    return float(value)


def non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name}: expected a number ≥ 0, got {value!r}")
    return float(value)


def in_range(name: str, value: float, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def linear_head(hidden, weight, targets, bias) -> None:
    """The inputs of the linear (hidden × LM head) ops: hidden ``[..., H]``, weight ``[V, H]`` of the same
    dtype and device, targets ``hidden.shape[:-1]`` of an index dtype, optional bias ``[V]``."""
    tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    tensor("targets", targets, dtypes=INDEX_DTYPES)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, {H}] (H = hidden.shape[-1]), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), got {tuple(targets.shape)}"
        )
    same_device("weight", weight, "hidden", hidden)
    same_device("targets", targets, "hidden", hidden)
    if bias is not None:
        tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (V = weight.shape[0]), got {tuple(bias.shape)}")
        same_device("bias", bias, "hidden", hidden)


def clip_range(clip_low, clip_high, dual_clip) -> tuple[float, float, float | None]:
    """PPO clipping: clip_low in [0, 1], clip_high ≥ 0 (default clip_low), dual_clip None or > 1."""
    clip_low = in_range("clip_low", clip_low, 0.0, 1.0)
    clip_high = clip_low if clip_high is None else non_negative("clip_high", clip_high)
    if dual_clip is not None:
        if isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)) or not dual_clip > 1:
            raise ValueError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
        dual_clip = float(dual_clip)
    return clip_low, clip_high, dual_clip

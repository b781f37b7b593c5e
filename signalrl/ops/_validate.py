"""Argument checks for the public ops: errors name the argument, what was expected and what came.

Most read only shapes, dtypes and devices (never tensor values), so they cost no host sync. The two *value*
checks (:func:`targets_in_range`, :func:`mask_values`) read tensor values, and run only where that costs no device
synchronization: on CPU tensors, outside ``torch.compile`` tracing (:func:`host_checkable`). On CUDA they are
skipped and the kernels' defined behaviour applies instead (docs/backends.md, "Bad inputs").
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

from ._library import NativeHelper

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
    """Validate an optional mask's dtype, shape (``ref``'s) and device; its values: :func:`mask_values`."""
    if mask is None:
        return None
    tensor(name, mask, dtypes=MASK_DTYPES)
    same_shape(name, mask, ref_name, ref)
    same_device(name, mask, ref_name, ref)
    return mask


def _is_number(value) -> bool:
    """A real Python/NumPy number; bool is not a number here, and neither is a tensor (reading it could sync)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor))


def positive(name: str, value: float) -> float:
    """A finite number > 0 (temperature, value clip)."""
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def optional_positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name}: expected None or a positive number, got {value!r}")
    return float(value)


def non_negative(name: str, value: float) -> float:
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{name}: expected a number ≥ 0, got {value!r}")
    return float(value)


def in_range(name: str, value: float, lo: float, hi: float) -> float:
    if not _is_number(value) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def finite(name: str, value: float) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def flag(name: str, value) -> bool:
    """A Python bool (a truthy string or tensor is a mistake, not a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


_INT64 = (-(2**63), 2**63 - 1)


def index(name: str, value) -> int:
    """An int64 class index such as ``ignore_index``: int or NumPy integer; not bool, float or tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name}: expected an int64 value, got {value}")
    return value


def choice(name: str, value: str, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def linear_head(hidden, weight, targets, bias) -> None:
    """The inputs of the linear (hidden × LM head) ops: hidden ``[..., H]`` with H ≥ 1, weight ``[V, H]`` with
    V ≥ 1 of the same dtype and device, targets ``hidden.shape[:-1]`` of an index dtype, optional bias ``[V]`` of
    the same dtype."""
    tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    tensor("targets", targets, dtypes=INDEX_DTYPES)
    H = hidden.shape[-1]
    if H == 0:
        raise ValueError(f"hidden: expected a non-empty feature dimension (H = hidden.shape[-1] ≥ 1), got shape "
                         f"{tuple(hidden.shape)}")
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, {H}] (H = hidden.shape[-1]), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected at least one row (V = weight.shape[0] ≥ 1), got shape "
                         f"{tuple(weight.shape)}")
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
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype} (the dtype of hidden), got {bias.dtype}")
        same_device("bias", bias, "hidden", hidden)


def clip_range(clip_low, clip_high, dual_clip) -> tuple[float, float, float | None]:
    """PPO clipping: clip_low in [0, 1], clip_high ≥ 0 (default clip_low), dual_clip None or > 1."""
    clip_low = in_range("clip_low", clip_low, 0.0, 1.0)
    clip_high = clip_low if clip_high is None else non_negative("clip_high", clip_high)
    if dual_clip is not None:
        if not _is_number(dual_clip) or not dual_clip > 1:
            raise ValueError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
        dual_clip = float(dual_clip)
    return clip_low, clip_high, dual_clip


# --- value checks: CPU only (no device sync), skipped while torch.compile traces --------------------------------


def host_checkable(x: torch.Tensor) -> bool:
    """Whether reading ``x``'s values costs no device synchronization: a CPU tensor, outside torch.compile
    tracing (a data-dependent branch would break the graph). CUDA tensors are never read (no host sync)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _first_bad(name: str, x: torch.Tensor, bad: torch.Tensor, expected: str):
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(x.shape))) if x.dim() > 1 else flat
    value = x.reshape(-1)[flat].item()
    raise ValueError(f"{name}: expected {expected}, got {value!r} at index {pos}")


# One native pass over int64 / int32 targets (csrc/cpu/logprobs.cpp, registered when the extension loads): true if a
# target is bad. Like MASK_CHECK below, a host-side helper of this module, CPU only.
TARGETS_CHECK = NativeHelper("targets_check", "(Tensor targets, int V, int ignore_index) -> Tensor",
                             lambda targets, V, ignore_index: targets.new_empty((), dtype=torch.bool))


def targets_in_range(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """Every target (int64 / int32, as the callers have checked) is a class index in [0, V) or ``ignore_index`` (CPU
    tensors only, see :func:`host_checkable`)."""
    if targets.numel() == 0 or not host_checkable(targets):
        return
    if TARGETS_CHECK.passes(targets, V, ignore_index):
        return  # one pass, no temporaries; a bad target is located and reported below
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    if bool(bad.any()):
        _first_bad("targets", targets, bad, f"class indices in [0, {V}) or ignore_index={ignore_index}")


# The same check as one native pass (csrc/cpu/ppo.cpp, registered when the extension loads): true if a value is
# bad. Not a kernel of the contract: a host-side helper of this module, CPU only.
MASK_CHECK = NativeHelper("mask_check", "(Tensor mask) -> Tensor", lambda mask: mask.new_empty((), dtype=torch.bool))


def mask_values(name: str, mask: torch.Tensor | None) -> None:
    """A mask holds finite values ≥ 0: 0 = not counted, > 0 = counted with that weight (CPU tensors only)."""
    if mask is None or mask.dtype == torch.bool or mask.dtype == torch.uint8 or mask.numel() == 0:
        return
    if not host_checkable(mask):
        return
    if MASK_CHECK.passes(mask):
        return  # one pass, no temporaries; a bad mask is located and reported below
    if mask.is_floating_point():
        bad = ~((mask >= 0) & (mask < math.inf))  # NaN compares false: bad
    else:
        bad = mask < 0
    if bool(bad.any()):
        _first_bad(name, mask, bad, "finite values ≥ 0 (0 = not counted, > 0 = counted with that weight)")

"""Shared launch helpers for the Triton kernel families (small and stable on purpose).

- ``INTERPRET``: whether ``TRITON_INTERPRET`` was on when this module was imported. ``@triton.jit`` decides
  between the compiled and the interpreted kernel at decoration time, so the flag is read once, here.
- ``tl_dtype``: the ``triton.language`` dtype for a torch dtype.
- ``maybe_autotune``: ``triton.autotune`` on a GPU, the identity under the interpreter (where the launcher passes
  one fixed config instead: autotuning in the interpreter would run every config, slowly).
- ``prune_configs``: drops autotune configs whose blocks exceed the problem or whose shared memory does not fit.
- ``split_lse``: a float64 log-sum-exp -> (hi, lo) float32 with hi + lo = lse to ~2^-48 relative, for p = exp((z - hi)
  - lo) in float32 (see docs/backends.md: why lse crosses the forward/backward boundary in float64).
- ``empty_f32``: the ``[0]`` float32 placeholder the backend contract uses where a custom op cannot return None.
- ``interp_store_dtype``: the dtype a kernel should write instead of ``dtype`` under the interpreter. The interpreter
  converts float32 -> bfloat16 by truncation (a GPU rounds to nearest even), which doubles the rounding error; kernels
  there write float32 and the launcher rounds with torch, so interpreter tests see GPU numerics.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "tl_dtype",
    "next_pow2",
    "cdiv",
    "maybe_autotune",
    "prune_configs",
    "max_shared_memory",
    "empty_f32",
    "is_empty",
    "interp_store_dtype",
    "split_lse",
    "check_lse",
]

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
    torch.int64: tl.int64,
    torch.int32: tl.int32,
}


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype for a torch dtype (TypeError for unsupported ones)."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"no Triton dtype for {dtype}") from None


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@triton.jit
def split_lse(lse):
    """float64 lse -> (hi, lo) float32, hi = fl32(lse), lo = fl32(lse - hi). z - hi is exact for z near lse
    (Sterbenz), so log p = (z - hi) - lo carries none of hi's rounding (|lse|·2^-24, 6e-4 at |lse| = 1e4).
    lo is 0 where lse is not finite (as a float32 lse would act: an inf logit gives NaN in its own column only)."""
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    return hi, tl.where(lo == lo, lo, 0.0)


def check_lse(fn: str, lse: torch.Tensor) -> None:
    """The backward's lse must be the forward's float64 one (a float32 lse would silently lose precision)."""
    if lse.dtype != torch.float64:
        raise TypeError(f"{fn}: lse must be float64 (the forward's output), got {lse.dtype}")


def empty_f32(device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


def is_empty(t) -> bool:
    return t is None or t.numel() == 0


def interp_store_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


@functools.lru_cache(maxsize=None)
def max_shared_memory(device_index: int = 0) -> int:
    """Bytes of shared memory one program may use on this CUDA device (a conservative 96 KiB if unknown)."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - depends on the driver
        return 96 * 1024


def prune_configs(
    configs: Sequence[triton.Config],
    *,
    limits: dict[str, int] | None = None,
    smem_bytes: Callable[[dict, int], int] | None = None,
) -> list[triton.Config]:
    """Keep the configs that fit.

    ``limits`` maps a block name to the largest useful value (e.g. ``{"BLOCK_N": next_pow2(N)}``); a config with a
    larger block is dropped unless nothing smaller exists (then the smallest such config is kept).
    ``smem_bytes(kwargs, num_stages)`` estimates shared memory; configs above the device limit are dropped.
    Never returns an empty list: if everything is pruned, the config with the smallest footprint survives.
    """
    configs = list(configs)
    kept = []
    for c in configs:
        ok = True
        for name, lim in (limits or {}).items():
            if name in c.kwargs and c.kwargs[name] > max(lim, 1):
                ok = False
        if ok and smem_bytes is not None and not INTERPRET and torch.cuda.is_available():
            if smem_bytes(c.kwargs, c.num_stages) > max_shared_memory(torch.cuda.current_device()):
                ok = False
        if ok:
            kept.append(c)
    if kept:
        return kept

    def footprint(c):
        blocks = 1
        for v in c.kwargs.values():
            blocks *= int(v) if isinstance(v, int) else 1
        return blocks * c.num_stages

    return [min(configs, key=footprint)]


def maybe_autotune(configs: Iterable[triton.Config], key: list[str], prune: Callable | None = None, **kw):
    """``triton.autotune(configs, key, prune_configs_by=...)`` on a GPU; the identity under the interpreter."""

    def deco(fn):
        if INTERPRET:
            return fn
        extra = dict(kw)
        if prune is not None:
            extra["prune_configs_by"] = {"early_config_prune": prune}
        return triton.autotune(configs=list(configs), key=key, **extra)(fn)

    return deco

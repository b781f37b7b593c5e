"""Masked statistics and GRPO group normalization: validated wrappers over
:mod:`signalrl.reference.stats`.

These are a handful of reductions over ``[B, T]`` tensors that PyTorch already runs at memory speed,
so every backend uses the reference implementation (autograd included). No host syncs.
Masks select: whatever a masked element holds (NaN, ±inf), results and gradients are those with 0 there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _validate as v


def _check_mask(mask, x: Tensor) -> None:
    if mask is None:
        return
    v.tensor("mask", mask, dtypes=v.MASK_DTYPES)
    v.same_device("mask", mask, "x", x)
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask: expected a shape broadcastable to {tuple(x.shape)} (the shape of x), got {tuple(mask.shape)}"
        ) from None
    if torch.broadcast_shapes(mask.shape, x.shape) != x.shape:
        raise ValueError(f"mask: expected a shape that broadcasts to {tuple(x.shape)}, got {tuple(mask.shape)}")


def masked_mean(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    """Σ x·m / max(Σ m, 1) over ``dim`` (all dims if None); a mean over nothing is 0, not NaN.

    x: any float tensor; mask: broadcastable to ``x``, 1 (True) where an element counts.
    float32 result (float64 for float64 input).
    """
    v.tensor("x", x, dtypes=v.FLOAT_DTYPES)
    _check_mask(mask, x)
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        for d in dims:
            if not isinstance(d, int) or not -max(x.dim(), 1) <= d < max(x.dim(), 1):
                raise ValueError(f"dim: expected dimensions of a {x.dim()}-d tensor, got {dim!r}")
    return reference.masked_mean(x, mask, dim)


def masked_whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over counted elements (unbiased variance); the mean is added
    back when ``shift_mean`` is False; positions outside the mask are 0. float32 result."""
    v.tensor("x", x, dtypes=v.FLOAT_DTYPES)
    _check_mask(mask, x)
    eps = v.non_negative("eps", eps)
    return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)


def group_normalize(rewards: Tensor, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO advantages for rewards ``[B, S]`` (B prompts × S samples):
    A = (r − mean_S r) / (std_S r + eps) (unbiased std, 0 for S = 1); ``scale=False`` gives
    Dr. GRPO's A = r − mean_S r. float32 result (float64 for float64 input)."""
    v.tensor("rewards", rewards, dtypes=v.FLOAT_DTYPES, min_dim=1)
    if rewards.shape[-1] == 0:
        raise ValueError(f"rewards: expected at least one sample per group, got shape {tuple(rewards.shape)}")
    eps = v.non_negative("eps", eps)
    return reference.group_normalize(rewards, eps=eps, scale=scale)

"""Aggregations of a per-token loss, written once: the names (:data:`AGGREGATIONS`), the reference
reduction (:func:`aggregate`) and the same reduction as per-token weights (:func:`token_weights`, which the
fused kernels and the losses use: every aggregation is Σ_i w_i·ℓ_i with weights that depend on the mask only).
"""
from __future__ import annotations

import math

import torch

from .stats import zero_outside

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _rows(x: torch.Tensor) -> torch.Tensor:
    # rows by the product of the leading sizes, not -1: a [0, 0] batch has no inferable row count
    return x.unsqueeze(0) if x.dim() == 1 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x) if mask is None else mask.to(x.dtype).reshape(x.shape)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar. With m the mask and B' the number of rows
    that have at least one counted token:

    - ``token-mean``:              Σ x·m / Σ m
    - ``seq-mean-token-sum``:      (1/B') Σ_rows Σ_t x·m
    - ``seq-mean-token-mean``:     (1/B') Σ_rows (Σ_t x·m / Σ_t m)
    - ``seq-mean-token-sum-norm``: Σ x·m / (B·T)   (Dr. GRPO: a constant horizon, no length bias)

    Every denominator is clamped to ≥ 1, so an all-masked batch gives 0, and so does an empty one.
    """
    m = _rows(_mask_for(per_token, mask))
    x = zero_outside(_rows(per_token), m)
    if mode == "token-mean":
        return (x * m).sum() / m.sum().clamp_min(1.0)
    row_tokens = m.sum(-1)
    rows_valid = (row_tokens > 0).to(x.dtype).sum().clamp_min(1.0)
    if mode == "seq-mean-token-sum":
        return (x * m).sum() / rows_valid
    if mode == "seq-mean-token-mean":
        return ((x * m).sum(-1) / row_tokens.clamp_min(1.0)).sum() / rows_valid
    if mode == "seq-mean-token-sum-norm":
        return (x * m).sum() / float(max(x.numel(), 1))
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {mode!r}")


def token_weights(
    mask: torch.Tensor | None,
    aggregation: str,
    shape: torch.Size | None = None,
    device: torch.device | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Weights of the mask's shape (a 1-D mask is one row) in ``dtype`` with aggregate(ℓ, mask, aggregation) = Σ w·ℓ.

    - token-mean: m / Σm;  seq-mean-token-sum: m / B';  seq-mean-token-mean: m / (B'·Σ_t m);
    - seq-mean-token-sum-norm: m / (B·T), or m / ``norm_constant`` when given (a global horizon);
    with B' the rows holding a counted token, denominators ≥ 1.
    No host sync: built from tensor ops only. ``shape`` (and ``device``) are required when ``mask`` is None.
    """
    m = torch.ones(shape, dtype=dtype, device=device) if mask is None else mask.to(dtype)
    rows = _rows(m)
    if aggregation == "token-mean":
        w = rows / rows.sum().clamp_min(1.0)
    elif aggregation == "seq-mean-token-sum-norm":
        w = rows / float(max(rows.numel(), 1) if norm_constant is None else norm_constant)
    elif aggregation in ("seq-mean-token-sum", "seq-mean-token-mean"):
        row_tokens = rows.sum(-1, keepdim=True)
        rows_valid = (row_tokens > 0).to(dtype).sum().clamp_min(1.0)
        w = rows / rows_valid
        if aggregation == "seq-mean-token-mean":
            w = w / row_tokens.clamp_min(1.0)
    else:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    return w.reshape(m.shape)

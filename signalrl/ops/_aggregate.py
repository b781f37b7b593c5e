"""Aggregations as per-token weights: every aggregation of :func:`signalrl.reference.aggregate`
equals Σ_i w_i·ℓ_i for weights that depend on the mask only, so fused kernels take ``weights``.
"""
from __future__ import annotations

import math

import torch

from ..reference.ppo import AGGREGATIONS


def token_weights(
    mask: torch.Tensor | None, aggregation: str, shape: torch.Size | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Weights ``[B, T]`` float32 (a 1-D mask is one row) such that aggregate(ℓ, mask, aggregation) = Σ w·ℓ.

    - token-mean: m / Σm;  seq-mean-token-sum: m / B';  seq-mean-token-mean: m / (B'·Σ_t m);
    - seq-mean-token-sum-norm: m / (B·T);  with B' the rows holding a counted token, denominators ≥ 1.
    No host sync: built from tensor ops only. ``shape`` (and ``device``) are required when ``mask`` is None.
    """
    if mask is None:
        m = torch.ones(shape, dtype=torch.float32, device=device)
    else:
        m = mask.to(torch.float32)
    rows = m.unsqueeze(0) if m.dim() == 1 else m.reshape(math.prod(m.shape[:-1]), m.shape[-1])
    if aggregation == "token-mean":
        w = rows / rows.sum().clamp_min(1.0)
    elif aggregation == "seq-mean-token-sum-norm":
        w = rows / float(max(rows.numel(), 1))
    elif aggregation in ("seq-mean-token-sum", "seq-mean-token-mean"):
        row_tokens = rows.sum(-1, keepdim=True)
        rows_valid = (row_tokens > 0).to(torch.float32).sum().clamp_min(1.0)
        w = rows / rows_valid
        if aggregation == "seq-mean-token-mean":
            w = w / row_tokens.clamp_min(1.0)
    else:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    return w.reshape(m.shape)

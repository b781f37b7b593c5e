"""Masked statistics and GRPO group normalization.

``mask`` is 1 (or True) where a position counts. A mean over no counted position is 0, not NaN.
Masks *select*: whatever a masked position holds (NaN, ±inf), results and gradients are those with 0 there.
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype


def _mask_like(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(x)
    return mask.to(x.dtype).expand_as(x)


def zero_outside(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where m ≠ 0, else 0: a select, never x·m (NaN·0 = NaN); the gradient outside is exactly 0."""
    return torch.where(m != 0, x, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Σ x·m / max(Σ m, 1) over ``dim`` (all dims if None)."""
    x = x.to(acc_dtype(x))
    m = _mask_like(x, mask)
    x = zero_outside(x, m)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of the counted elements (Bessel-corrected when ``unbiased`` and more than one counts)."""
    x = x.to(acc_dtype(x))
    m = _mask_like(x, mask)
    x = zero_outside(x, m)
    n = m.sum()
    mean = (x * m).sum() / n.clamp_min(1.0)
    ss = (((x - mean) ** 2) * m).sum()
    denom = (n - 1.0).clamp_min(1.0) if unbiased else n.clamp_min(1.0)
    return ss / denom


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over counted elements (mean added back if not ``shift_mean``);
    positions outside the mask are returned as 0."""
    x = x.to(acc_dtype(x))
    m = _mask_like(x, mask)
    x = zero_outside(x, m)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def group_normalize(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO advantages for rewards ``[B, S]`` (B prompts, S samples each).

    A = (r − mean_S(r)) / (std_S(r) + eps) with the unbiased std over the group (0 when S = 1);
    ``scale=False`` gives Dr. GRPO's A = r − mean_S(r).
    """
    r = rewards.to(acc_dtype(rewards))
    centered = r - r.mean(dim=-1, keepdim=True)
    if not scale:
        return centered
    s = r.shape[-1]
    std = r.std(dim=-1, keepdim=True) if s > 1 else torch.zeros_like(r[..., :1])
    return centered / (std + eps)

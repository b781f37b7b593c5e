"""Per-token KL estimators between the policy and a reference policy.

With d = logprobs − ref_logprobs (log π_θ − log π_ref, sampled under π_θ):

    k1  = d                          (unbiased, can be negative)
    k2  = ½·d²                       (biased, low variance)
    k3  = exp(−d) − (−d) − 1         (unbiased, non-negative; Schulman's estimator)
    abs = |d|
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Element-wise KL estimate, same shape as the inputs, float32 (float64 for float64 input)."""
    dt = acc_dtype(logprobs, ref_logprobs)
    d = logprobs.to(dt) - ref_logprobs.to(dt)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        # exp(−d) + d − 1 cancels catastrophically near d = 0 in float32; float64 keeps it exact enough.
        d64 = d.to(torch.float64)
        return (torch.exp(-d64) + d64 - 1.0).to(dt)
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")

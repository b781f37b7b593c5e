"""Triton kernels for the per-token KL estimators between the policy and a reference policy. Family ``kl``
(:mod:`signalrl.ops.kl`; reference :mod:`signalrl.reference.kl`, native ``csrc/cpu/kl.cpp``).

Kernel functions (1-D contiguous ``[N]`` tensors; float32, bfloat16 or float16 inputs are read as float32)::

    kl_penalty_fwd(logprobs, ref_logprobs, estimator: str) -> kl[N] f32   (k3 without cancellation near d = 0)
    kl_penalty_bwd(grad_kl[N] f32, logprobs, ref_logprobs, estimator: str) -> grad_logprobs[N] f32
      (the gradient of ref_logprobs is its negation: every estimator is a function of lp − ref).

Device function for other kernels' epilogues (the PPO epilogue of :mod:`signalrl.kernels.ppo` calls it)::

    _kl_math(d, KL_EST) -> (kl, dkl/dd)                       KL_EST = KL_CODES[estimator]

Memory: the output only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}

_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _kl_math(d, KL_EST: tl.constexpr):
    """KL estimate of d = lp − ref and its derivative in d (k1, k2, k3, abs)."""
    if KL_EST == 0:
        kl = d
        g = tl.full(d.shape, 1.0, tl.float32)
    elif KL_EST == 1:
        kl = 0.5 * d * d
        g = d
    elif KL_EST == 2:
        # exp(−d) + d − 1 and 1 − exp(−d) cancel catastrophically near d = 0 (where a policy close to its
        # reference lives): for |d| < 1/2 use their Taylor series, truncated below 1e-9 relative.
        e = tl.exp(-d)
        small = tl.abs(d) < 0.5
        p = 1.0 / 3628800.0
        p = p * d - 1.0 / 362880.0
        p = p * d + 1.0 / 40320.0
        p = p * d - 1.0 / 5040.0
        p = p * d + 1.0 / 720.0
        p = p * d - 1.0 / 120.0
        p = p * d + 1.0 / 24.0
        p = p * d - 1.0 / 6.0
        p = p * d + 0.5  # k3 = d²·(1/2 − d/6 + d²/24 − …)
        q = 1.0 / 362880.0
        q = q * d - 1.0 / 40320.0
        q = q * d + 1.0 / 5040.0
        q = q * d - 1.0 / 720.0
        q = q * d + 1.0 / 120.0
        q = q * d - 1.0 / 24.0
        q = q * d + 1.0 / 6.0
        q = q * d - 0.5
        q = q * d + 1.0  # 1 − exp(−d) = d·(1 − d/2 + d²/6 − …)
        kl = tl.where(small, d * d * p, e + d - 1.0)
        g = tl.where(small, d * q, 1.0 - e)
    else:
        kl = tl.abs(d)
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return kl, g


@triton.jit
def _kl_fwd_kernel(lp_ptr, ref_ptr, out_ptr, N, KL_EST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    kl, _ = _kl_math(lp - ref, KL_EST)
    tl.store(out_ptr + offs, kl, mask=inb)


@triton.jit
def _kl_bwd_kernel(g_ptr, lp_ptr, ref_ptr, out_ptr, N, KL_EST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    _, dkl = _kl_math(lp - ref, KL_EST)
    tl.store(out_ptr + offs, g * dkl, mask=inb)


# ----------------------------------------------------------------------------- launchers
def _kl_code(estimator: str) -> int:
    if estimator not in KL_CODES:
        raise ValueError(f"kl_estimator: expected one of {tuple(KL_CODES)}, got {estimator!r}")
    return KL_CODES[estimator]


def kl_penalty_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate (float32), see :mod:`signalrl.reference.kl`."""
    n = logprobs.numel()
    out = torch.empty(n, dtype=torch.float32, device=logprobs.device)
    if n:
        _kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            logprobs, ref_logprobs, out, n, KL_EST=_kl_code(estimator), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return out


def kl_penalty_bwd(
    grad_kl: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str
) -> torch.Tensor:
    """grad_kl · ∂KL/∂logprobs (float32); the gradient of ref_logprobs is its negation."""
    n = logprobs.numel()
    out = torch.empty(n, dtype=torch.float32, device=logprobs.device)
    if n:
        _kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            grad_kl, logprobs, ref_logprobs, out, n, KL_EST=_kl_code(estimator), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return out

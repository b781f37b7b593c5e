"""Generalized advantage estimation with exact mask semantics.

Family ``gae``: the math is :func:`signalrl.reference.gae`, the Triton kernel a reverse parallel scan
(:mod:`signalrl.kernels.gae`), the C++ kernel ``csrc/cpu/gae.cpp``. This module holds the kernel op's contract and the
public op, which validates, flattens ``[..., T]`` to ``[B, T]``, picks a backend and calls the kernel op. GAE has no
gradient: the inputs are read as constants (as in every PPO code base) and the outputs do not require grad.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..kernels.params import GAEParams
from . import _validate as v
from ._backend import backend_for
from ._check import check_enabled, checked
from ._library import KernelOp

_F32 = torch.float32


def _gae_fake(rewards, values, mask, last_values, gamma, lam):
    return torch.empty_like(rewards, dtype=_F32), torch.empty_like(rewards, dtype=_F32)


# rewards, values [B, T] (float32 for native), mask [B, T] (uint8 for Triton; any dtype, nonzero = valid, for
# native), last_values [B] float32 → (advantages, returns) [B, T] float32
GAE_FWD = KernelOp(
    "gae_fwd",
    f"(Tensor rewards, Tensor values, Tensor mask, Tensor last_values, {GAEParams.schema()}) -> (Tensor, Tensor)",
    _gae_fake,
)


@GAE_FWD.triton
def _(rewards, values, mask, last_values, gamma, lam):
    from ..kernels import gae  # Triton: imported on first use

    return gae.gae_fwd(rewards, values, mask, last_values, gamma, lam)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
    last_values: Tensor | None = None,
):
    """Advantages and returns by GAE(γ, λ).

    Args:
        rewards, values: ``[B, T]`` (or ``[..., T]``; 1-D is one row), float32, bfloat16 or float16
            (float64 runs the reference), same shape and device.
        mask: optional ``[B, T]``, nonzero (True) where a token is part of the trajectory. Rewards and
            values outside it are never read into the result (NaN or inf there change nothing). Its values
            must be finite and ≥ 0 as for every op's mask (a ``ValueError`` on CPU; unchecked on CUDA).
        gamma, lam: discount and GAE λ, in [0, 1].
        last_values: optional ``[B]`` (``rewards.shape[:-1]``) bootstrap value after the last valid
            token of each row; 0 if None.

    Returns:
        ``(advantages, returns)``, float32 ``[B, T]`` (float64 for float64 input), not differentiable.
        B = 0 or T = 0 gives empty outputs of the input shape.

    Math: per row, drop masked positions, then δ_k = r_k + γ·V_{k+1} − V_k (V_{K+1} = last_values),
    A_k = δ_k + γλ·A_{k+1}, R_k = A_k + V_k, scattered back with 0 at masked positions. This covers
    right padding, left padding and masked spans (tool output in multi-turn rollouts).
    Memory: the two float32 outputs (the native backend adds float32 copies of the mask and of
    non-float32 inputs).
    """
    v.tensor("rewards", rewards, dtypes=v.FLOAT_DTYPES, min_dim=1)
    v.tensor("values", values, dtypes=v.FLOAT_DTYPES)
    v.same_shape("values", values, "rewards", rewards)
    v.same_device("values", values, "rewards", rewards)
    v.optional_mask("mask", mask, "rewards", rewards)
    gamma = v.in_range("gamma", gamma, 0.0, 1.0)
    lam = v.in_range("lam", lam, 0.0, 1.0)
    lead, T = rewards.shape[:-1], rewards.shape[-1]
    if last_values is not None:
        v.tensor("last_values", last_values, dtypes=v.FLOAT_DTYPES)
        if last_values.shape != lead:
            raise ValueError(
                f"last_values: expected shape {tuple(lead)} (rewards.shape[:-1]), got {tuple(last_values.shape)}"
            )
        v.same_device("last_values", last_values, "rewards", rewards)
    v.mask_values("mask", mask)
    B = math.prod(lead)

    def rows(x):
        return None if x is None else x.detach().reshape(B, T)

    def ref_fn(r, val, m, last):
        lv = None if last is None else last.reshape(-1)
        adv, ret = reference.gae(rows(r), rows(val), rows(m), gamma=gamma, lam=lam, last_values=lv)
        return adv.reshape(r.shape), ret.reshape(r.shape)

    backend = backend_for(GAE_FWD, rewards)
    if torch.float64 in (rewards.dtype, values.dtype) or rewards.numel() == 0:
        backend = "reference"
    if backend == "reference":
        return ref_fn(rewards, values, mask, last_values)

    op = GAE_FWD.op(backend, rewards.device)
    params = GAEParams(gamma, lam)

    def fast_fn(r, val, m, last):
        r2, v2 = rows(r).contiguous(), rows(val).contiguous()
        if m is None:
            m2 = torch.ones_like(r2, dtype=_F32)
        elif backend == "triton":  # reads a 1-byte mask: a bool mask goes in as is (a uint8 view)
            m2 = (rows(m) if m.dtype == torch.bool else rows(m) != 0).contiguous()
            # Inductor cannot lower a bool -> uint8 view on CUDA (torch 2.11); compiled, the cast fuses anyway
            m2 = m2.to(torch.uint8) if torch.compiler.is_compiling() else m2.view(torch.uint8)
        else:  # the C++ kernel reads any dtype as "nonzero = valid" and converts it once itself
            m2 = rows(m).contiguous()
        if backend == "native":  # the C++ kernel takes float32 (docs/backends.md)
            r2, v2 = r2.to(_F32), v2.to(_F32)
        lv = r2.new_zeros(r2.shape[0], dtype=_F32) if last is None else last.detach().reshape(-1).to(_F32).contiguous()
        adv, ret = op(r2, v2, m2, lv, *params.flat())
        return adv.reshape(r.shape), ret.reshape(r.shape)

    inputs = (rewards, values, mask, last_values)
    if check_enabled():
        return checked("gae", fast_fn, ref_fn, inputs, rewards.dtype)
    return fast_fn(*inputs)

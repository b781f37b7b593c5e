"""Per-token KL estimators between the policy and a reference policy.

Family ``kl``: the math is :mod:`signalrl.reference.kl`, the Triton kernels :mod:`signalrl.kernels.kl`, the C++
kernels ``csrc/cpu/kl.cpp``. This module holds the kernel ops' contract (schemas and fakes, :class:`KernelOp`) and the
public op, which validates, picks a backend and calls the kernel op; in check mode every call is compared with the
reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..kernels.params import KLParams
from ..reference.kl import KL_ESTIMATORS
from . import _validate as v
from ._backend import backend_for
from ._check import check_enabled, checked
from ._library import KernelOp

_F32 = torch.float32


def _kl_fake(logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape[0], dtype=_F32)


def _kl_bwd_fake(grad_kl, logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape[0], dtype=_F32)


# [N] vectors (float32, bfloat16 or float16, read as float32) → kl [N] float32
KL_FWD = KernelOp("kl_penalty_fwd", f"(Tensor logprobs, Tensor ref_logprobs, {KLParams.schema()}) -> Tensor", _kl_fake)
# grad_kl [N] float32 → grad_logprobs [N] float32 (the gradient of ref_logprobs is its negation)
KL_BWD = KernelOp(
    "kl_penalty_bwd", f"(Tensor grad_kl, Tensor logprobs, Tensor ref_logprobs, {KLParams.schema()}) -> Tensor",
    _kl_bwd_fake,
)


@KL_FWD.triton
def _(logprobs, ref_logprobs, estimator):
    from ..kernels import kl  # Triton: imported on first use

    return kl.kl_penalty_fwd(logprobs, ref_logprobs, estimator)


@KL_BWD.triton
def _(grad_kl, logprobs, ref_logprobs, estimator):
    from ..kernels import kl

    return kl.kl_penalty_bwd(grad_kl, logprobs, ref_logprobs, estimator)


def _kl_setup(ctx, inputs, output):
    logprobs, ref_logprobs, *params = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.params = params


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    need_lp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_lp or need_ref):
        return None, None, None
    g = KL_BWD.variant(ctx.variant)(grad.to(_F32).contiguous(), logprobs, ref_logprobs, *ctx.params)
    # every estimator is a function of d = logprobs − ref_logprobs, so ∂/∂ref = −∂/∂logprobs
    return (g.to(logprobs.dtype) if need_lp else None, (-g).to(ref_logprobs.dtype) if need_ref else None, None)


KL_FWD.register_autograd(_kl_backward, _kl_setup)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from log-probs of tokens sampled under π_θ.

    Args:
        logprobs: ``[B, T]`` (any shape) float32, bfloat16 or float16 (float64 runs the reference).
        ref_logprobs: the same shape and device, any float dtype (float64 runs the reference).
        estimator: with d = logprobs − ref_logprobs, ``k1`` = d, ``k2`` = ½·d²,
            ``k3`` = exp(−d) + d − 1 (unbiased and non-negative), ``abs`` = |d|.

    Returns:
        float32 tensor of the input shape (float64 for a float64 input; empty for an empty input).
        Differentiable in both inputs.
    Memory: the output plus, in backward, one float32 gradient of the input size.
    """
    v.tensor("logprobs", logprobs, dtypes=v.FLOAT_DTYPES)
    v.tensor("ref_logprobs", ref_logprobs, dtypes=v.FLOAT_DTYPES)
    v.same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    v.same_device("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    v.choice("estimator", estimator, KL_ESTIMATORS)

    def ref_fn(lp, ref):
        return reference.kl_penalty(lp, ref, estimator)

    backend = backend_for(KL_FWD, logprobs)
    if torch.float64 in (logprobs.dtype, ref_logprobs.dtype) or logprobs.numel() == 0:
        backend = "reference"
    if backend == "reference":
        return ref_fn(logprobs, ref_logprobs)

    shape = logprobs.shape
    op = KL_FWD.op(backend, logprobs.device)
    params = KLParams(estimator)

    def fast_fn(lp, ref):
        return op(lp.reshape(-1).contiguous(), ref.reshape(-1).contiguous(), *params.flat()).reshape(shape)

    if check_enabled():
        return checked("kl_penalty", fast_fn, ref_fn, (logprobs, ref_logprobs), logprobs.dtype)
    return fast_fn(logprobs, ref_logprobs)

"""Per-token KL estimators between the policy and a reference policy.

Validates, picks a backend and runs a ``torch.library`` custom op (Triton: ``kl_penalty_fwd`` /
``kl_penalty_bwd`` of :mod:`signalrl.kernels.kl`); the reference backend is
:func:`signalrl.reference.kl_penalty`. In check mode every call is compared with the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..reference.kl import KL_ESTIMATORS
from . import _validate as v
from ._backend import backend_for, get_impl
from ._check import check_enabled, checked

_F32 = torch.float32


@torch.library.custom_op("signalrl::kl_penalty_fwd", mutates_args=())
def _kl_fwd(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, backend: str) -> Tensor:
    return get_impl(backend, "kl", "kl_penalty_fwd")(logprobs, ref_logprobs, estimator)


@_kl_fwd.register_fake
def _(logprobs, ref_logprobs, estimator, backend):
    return logprobs.new_empty(logprobs.shape[0], dtype=_F32)


@torch.library.custom_op("signalrl::kl_penalty_bwd", mutates_args=())
def _kl_bwd(grad_kl: Tensor, logprobs: Tensor, ref_logprobs: Tensor, estimator: str, backend: str) -> Tensor:
    return get_impl(backend, "kl", "kl_penalty_bwd")(grad_kl, logprobs, ref_logprobs, estimator)


@_kl_bwd.register_fake
def _(grad_kl, logprobs, ref_logprobs, estimator, backend):
    return logprobs.new_empty(logprobs.shape[0], dtype=_F32)


def _kl_setup(ctx, inputs, output):
    logprobs, ref_logprobs, estimator, backend = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.args = (estimator, backend)


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    estimator, backend = ctx.args
    need_lp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_lp or need_ref):
        return None, None, None, None
    g = _kl_bwd(grad.to(_F32).contiguous(), logprobs, ref_logprobs, estimator, backend)
    # every estimator is a function of d = logprobs − ref_logprobs, so ∂/∂ref = −∂/∂logprobs
    return (g.to(logprobs.dtype) if need_lp else None,
            (-g).to(ref_logprobs.dtype) if need_ref else None, None, None)


torch.library.register_autograd("signalrl::kl_penalty_fwd", _kl_backward, setup_context=_kl_setup)


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

    backend = backend_for("kl", "kl_penalty_fwd", logprobs)
    if torch.float64 in (logprobs.dtype, ref_logprobs.dtype) or logprobs.numel() == 0:
        backend = "reference"
    if backend == "reference":
        return ref_fn(logprobs, ref_logprobs)

    shape = logprobs.shape

    def fast_fn(lp, ref):
        return _kl_fwd(lp.reshape(-1).contiguous(), ref.reshape(-1).contiguous(), estimator, backend).reshape(shape)

    if check_enabled():
        return checked("kl_penalty", fast_fn, ref_fn, (logprobs, ref_logprobs), logprobs.dtype)
    return fast_fn(logprobs, ref_logprobs)

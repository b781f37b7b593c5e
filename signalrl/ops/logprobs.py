"""Per-token log-probs (+ entropy) of target tokens from logits: ``token_logprobs``.

Family ``logprobs``: the math is :mod:`signalrl.reference.logprobs`, the Triton kernels
:mod:`signalrl.kernels.logprobs`, the C++ kernels ``csrc/cpu/logprobs.cpp``. This module holds the kernel ops'
contract (schemas and fakes, :class:`~signalrl.ops._library.KernelOp`; ``docs/backends.md``) and the public op, which
validates its arguments, flattens leading dimensions, picks a backend (:mod:`signalrl.ops._backend`) and calls the
kernel op. In check mode every call is compared with the reference in float64, values and gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..kernels.params import LogprobParams
from . import _validate as v
from ._backend import backend_for
from ._check import check_enabled, checked
from ._library import KernelOp

_F32 = torch.float32
_F64 = torch.float64  # lse crosses the forward/backward boundary in float64 (docs/backends.md)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=_F32)


# --- token_logprobs: kernel ops --------------------------------------------------------------

_LP = LogprobParams.schema()


def _fwd_fake(logits, targets, temperature, ignore_index, with_entropy):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=_F32), logits.new_empty(n if with_entropy else 0, dtype=_F32),
            logits.new_empty(n, dtype=_F64))


def _bwd_fake(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
    return torch.empty_like(logits)


def _bwd_inplace_fake(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
    return None


# logits [N, V] float32|bfloat16|float16, targets [N] int64 → (logprobs [N] f32, entropy [N] f32 | empty, lse [N] f64)
TOKEN_FWD = KernelOp(
    "token_logprobs_fwd",
    f"(Tensor logits, Tensor targets, {_LP}, bool with_entropy) -> (Tensor, Tensor, Tensor)",
    _fwd_fake,
)
# → grad_logits [N, V] in logits.dtype; grad_entropy / entropy empty: no entropy term
TOKEN_BWD = KernelOp(
    "token_logprobs_bwd",
    f"(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, Tensor targets, Tensor lse, Tensor entropy, {_LP})"
    " -> Tensor",
    _bwd_fake,
)
# the same, written into the logits' own storage (Triton only)
TOKEN_BWD_INPLACE = KernelOp(
    "token_logprobs_bwd_inplace",
    f"(Tensor grad_logprobs, Tensor grad_entropy, Tensor(a!) logits, Tensor targets, Tensor lse, Tensor entropy, "
    f"{_LP}) -> ()",
    _bwd_inplace_fake,
)


@TOKEN_FWD.triton
def _(logits, targets, temperature, ignore_index, with_entropy):
    from ..kernels import logprobs  # Triton: imported on first use

    return logprobs.token_logprobs_fwd(logits, targets, temperature, ignore_index, with_entropy)


@TOKEN_BWD.triton
def _(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
    from ..kernels import logprobs

    return logprobs.token_logprobs_bwd(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature,
                                       ignore_index)


@TOKEN_BWD_INPLACE.triton
def _(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
    from ..kernels import logprobs

    logprobs.token_logprobs_bwd_inplace(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature,
                                        ignore_index)


def grads_in(g_lp: Tensor | None, g_ent: Tensor | None, lp: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
    """The incoming gradients as the backward kernels take them: float32 ``[N]`` (zeros when None), and an empty
    entropy gradient when there is none."""
    g_lp = lp.new_zeros(lp.shape, dtype=_F32) if g_lp is None else g_lp.to(_F32).contiguous()
    g_ent = g_ent.to(_F32).contiguous() if (with_entropy and g_ent is not None) else _empty(lp)
    return g_lp, g_ent


def _token_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, with_entropy = inputs
    lp, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, lse, ent)
    ctx.args = (temperature, ignore_index, with_entropy)
    ctx.inplace = False


def _token_backward(ctx, g_lp, g_ent, _g_lse):
    logits, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, with_entropy = ctx.args
    g_lp, g_ent = grads_in(g_lp, g_ent, lse, with_entropy)
    ent = ent if g_ent.numel() else _empty(lse)
    if ctx.inplace:
        TOKEN_BWD_INPLACE.variant(ctx.variant)(g_lp, g_ent, logits, targets, lse, ent, temperature, ignore_index)
        grad = logits
    else:
        grad = TOKEN_BWD.variant(ctx.variant)(g_lp, g_ent, logits, targets, lse, ent, temperature, ignore_index)
    return grad, None, None, None, None


TOKEN_FWD.register_autograd(_token_backward, _token_setup)


class _InplaceTokenLogprobs(torch.autograd.Function):
    """Same as the custom op but writes d(logits) into the logits' own storage (saves one [N, V] buffer).

    Only for callers that never read the logits again after backward (e.g. a loss head)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy, variant):
        lp, ent, lse = TOKEN_FWD.variant(variant)(logits, targets, temperature, ignore_index, with_entropy)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.args = (temperature, ignore_index, with_entropy)
        ctx.inplace, ctx.variant = True, variant
        return lp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_lse):
        return (*_token_backward(ctx, g_lp, g_ent, g_lse), None)


# --- token_logprobs: public op --------------------------------------------------------------


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
):
    """Log-probability of each target token under softmax(logits / temperature).

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64 runs the reference).
        targets: ``[...]`` int64/int32 token ids in ``[0, V)``, or ``ignore_index``. Any other value is a
            ``ValueError`` naming the first one for CPU tensors; on CUDA it is not checked (that would sync) and
            gives a NaN log-prob (docs/backends.md, "Bad inputs").
        temperature: T > 0 (finite); logits are divided by it.
        ignore_index: an int; targets with this value give 0 and receive no gradient.
        return_entropy: also return the entropy of softmax(logits / T) per position.
        inplace_backward: Triton only — write d(logits) into the logits buffer during backward
            (saves an ``[N, V]`` allocation; the logits must not be used after backward).

    Returns:
        log-probs ``[...]`` float32 (and entropy ``[...]`` float32; float64 for float64 logits). Ignored positions
        are 0. An empty ``[...]`` gives empty outputs; V = 0 is a ``ValueError``.

    Math: logprob = z_t − logsumexp(z), entropy = −Σ p log p, z = logits / T, with IEEE semantics for non-finite
    logits as ``torch.log_softmax``: a −inf logit has p = 0 (log-prob −inf if it is the target; entropy unaffected);
    a counted row holding a NaN or +inf logit, or only −inf, gives NaN log-prob and entropy (its gradient is
    unspecified).
    Memory: the fused backends read the logits once forward and once backward with an online
    log-sum-exp, allocating only O(N) float32 beside the ``[N, V]`` gradient; the reference
    materializes an ``[N, V]`` float32 log-softmax.
    """
    v.tensor("logits", logits, dtypes=v.FLOAT_DTYPES, min_dim=1)
    v.tensor("targets", targets, dtypes=v.INDEX_DTYPES)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(targets.shape)}"
        )
    v.same_device("targets", targets, "logits", logits)
    temperature = v.positive("temperature", temperature)
    ignore_index = v.index("ignore_index", ignore_index)
    return_entropy = v.flag("return_entropy", return_entropy)
    inplace_backward = v.flag("inplace_backward", inplace_backward)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension, got shape " f"{tuple(logits.shape)}")
    v.targets_in_range(targets, V, ignore_index)
    lead = targets.shape
    backend = backend_for(TOKEN_FWD, logits)
    if logits.dtype == torch.float64 or targets.numel() == 0:
        backend = "reference"

    def ref_fn(x, t):
        return reference.token_logprobs(
            x, t, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )

    if backend == "reference":
        return ref_fn(logits, targets)

    x = logits.reshape(-1, V)
    if x.stride(-1) != 1 or x.stride(0) != V:
        x = x.contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    use_inplace = inplace_backward and TOKEN_BWD_INPLACE.implemented_by(backend)
    op = TOKEN_FWD.op(backend, x.device)
    params = LogprobParams(temperature, int(ignore_index))

    def fast_fn(x, t):
        if use_inplace:
            variant = TOKEN_FWD.variant_of(backend, x.device)
            lp, ent, _ = _InplaceTokenLogprobs.apply(x, t, *params.flat(), return_entropy, variant)
        else:
            lp, ent, _ = op(x, t, *params.flat(), return_entropy)
        return (lp, ent) if return_entropy else lp

    out = checked("token_logprobs", fast_fn, ref_fn, (x, t), x.dtype) if check_enabled() else fast_fn(x, t)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)

"""Per-token log-probs (+ entropy) of target tokens, from logits or from hidden states × LM head.

The public functions validate their arguments, flatten leading dimensions, pick a backend
(:mod:`signalrl.ops._backend`) and run a ``torch.library`` custom op whose forward and backward
call that backend's kernel functions (contract: ``docs/backends.md``). The reference backend is
:mod:`signalrl.reference.logprobs` itself. In check mode every call is compared with the reference
in float64, values and gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from . import _validate as v
from ._backend import backend_for, get_impl
from ._check import check_enabled, checked

_F32 = torch.float32
_F64 = torch.float64  # lse crosses the forward/backward boundary in float64 (docs/backends.md)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=_F32)


# --- token_logprobs: custom ops --------------------------------------------------------------


@torch.library.custom_op("signalrl::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd(
    logits: Tensor, targets: Tensor, temperature: float, ignore_index: int, with_entropy: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    fn = get_impl(backend, "logprobs", "token_logprobs_fwd")
    return fn(logits, targets, temperature, ignore_index, with_entropy)


@_token_logprobs_fwd.register_fake
def _(logits, targets, temperature, ignore_index, with_entropy, backend):
    n = logits.shape[0]
    out = logits.new_empty(n, dtype=_F32)
    return out, logits.new_empty(n if with_entropy else 0, dtype=_F32), logits.new_empty(n, dtype=_F64)


@torch.library.custom_op("signalrl::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(
    grad_logprobs: Tensor, grad_entropy: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
    temperature: float, ignore_index: int, backend: str,
) -> Tensor:
    fn = get_impl(backend, "logprobs", "token_logprobs_bwd")
    return fn(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index)


@_token_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("signalrl::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(
    grad_logprobs: Tensor, grad_entropy: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
    temperature: float, ignore_index: int, backend: str,
) -> None:
    fn = get_impl(backend, "logprobs", "token_logprobs_bwd_inplace")
    fn(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index)


@_token_logprobs_bwd_inplace.register_fake
def _(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, backend):
    return None


def _grads_in(g_lp: Tensor | None, g_ent: Tensor | None, lp: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
    g_lp = lp.new_zeros(lp.shape, dtype=_F32) if g_lp is None else g_lp.to(_F32).contiguous()
    g_ent = g_ent.to(_F32).contiguous() if (with_entropy and g_ent is not None) else _empty(lp)
    return g_lp, g_ent


def _token_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, with_entropy, backend = inputs
    lp, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, lse, ent)
    ctx.args = (temperature, ignore_index, with_entropy, backend)
    ctx.inplace = False


def _token_backward(ctx, g_lp, g_ent, _g_lse):
    logits, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, with_entropy, backend = ctx.args
    g_lp, g_ent = _grads_in(g_lp, g_ent, lse, with_entropy)
    ent = ent if g_ent.numel() else _empty(lse)
    if ctx.inplace:
        _token_logprobs_bwd_inplace(g_lp, g_ent, logits, targets, lse, ent, temperature, ignore_index, backend)
        grad = logits
    else:
        grad = _token_logprobs_bwd(g_lp, g_ent, logits, targets, lse, ent, temperature, ignore_index, backend)
    return grad, None, None, None, None, None


torch.library.register_autograd("signalrl::token_logprobs_fwd", _token_backward, setup_context=_token_setup)


class _InplaceTokenLogprobs(torch.autograd.Function):
    """Same as the custom op but writes d(logits) into the logits' own storage (saves one [N, V] buffer).

    Only for callers that never read the logits again after backward (e.g. a loss head)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy, backend):
        lp, ent, lse = _token_logprobs_fwd(logits, targets, temperature, ignore_index, with_entropy, backend)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.args = (temperature, ignore_index, with_entropy, backend)
        ctx.inplace = True
        return lp, ent, lse

    backward = staticmethod(_token_backward)


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
    backend = backend_for("logprobs", "token_logprobs_fwd", logits)
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
    use_inplace = inplace_backward and get_impl(backend, "logprobs", "token_logprobs_bwd_inplace") is not None

    def fast_fn(x, t):
        if use_inplace:
            lp, ent, _ = _InplaceTokenLogprobs.apply(x, t, temperature, int(ignore_index), return_entropy, backend)
        else:
            lp, ent, _ = _token_logprobs_fwd(x, t, temperature, int(ignore_index), return_entropy, backend)
        return (lp, ent) if return_entropy else lp

    out = checked("token_logprobs", fast_fn, ref_fn, (x, t), x.dtype) if check_enabled() else fast_fn(x, t)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


# --- linear_token_logprobs: custom ops ------------------------------------------------------


@torch.library.custom_op("signalrl::linear_token_logprobs_fwd", mutates_args=())
def _linear_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float, ignore_index: int,
    with_entropy: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = get_impl(backend, "linear_logprobs", "linear_token_logprobs_fwd")
    return fn(hidden, weight, bias, targets, temperature, ignore_index, with_entropy)


@_linear_fwd.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend):
    n = hidden.shape[0]
    out = hidden.new_empty(n, dtype=_F32)
    return out, hidden.new_empty(n if with_entropy else 0, dtype=_F32), hidden.new_empty(n, dtype=_F64)


@torch.library.custom_op("signalrl::linear_token_logprobs_bwd", mutates_args=())
def _linear_bwd(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, lse: Tensor, entropy: Tensor, temperature: float, ignore_index: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = get_impl(backend, "linear_logprobs", "linear_token_logprobs_bwd")
    return fn(
        grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
        need_hidden, need_weight, need_bias,
    )


@_linear_bwd.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
      need_hidden, need_weight, need_bias, backend):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0, dtype=_F32)
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0, dtype=_F32)
    gb = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0, dtype=_F32)
    return gh, gw, gb


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend = inputs
    lp, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.args = (temperature, ignore_index, with_entropy, backend)


def _linear_backward(ctx, g_lp, g_ent, _g_lse):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, with_entropy, backend = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    g_lp, g_ent = _grads_in(g_lp, g_ent, lse, with_entropy)
    ent = ent if g_ent.numel() else _empty(lse)
    gh, gw, gb = _linear_bwd(
        g_lp, g_ent, hidden, weight, bias, targets, lse, ent, temperature, ignore_index,
        need_h, need_w, bool(need_b and bias is not None), backend,
    )
    return (gh if need_h else None, gw if need_w else None, gb if (need_b and bias is not None) else None,
            None, None, None, None, None)


torch.library.register_autograd("signalrl::linear_token_logprobs_fwd", _linear_backward, setup_context=_linear_setup)


# --- linear_token_logprobs: public op -------------------------------------------------------


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-probability of each target token from final hidden states and the LM head.

    Args:
        hidden: ``[..., H]`` float32, bfloat16 or float16.
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[...]`` int64/int32 in ``[0, V)`` or ``ignore_index`` (checked as in :func:`token_logprobs`).
        bias: optional ``[V]``, same dtype as ``hidden``.
        temperature, ignore_index, return_entropy: as in :func:`token_logprobs`. H = 0 or V = 0 is a ``ValueError``.

    Returns:
        log-probs ``[...]`` float32 (and entropy ``[...]`` float32).

    Math: z = (hidden @ weight.T + bias) / T; logprob = z_t − logsumexp(z).
    Memory: the fused backends never hold the ``[N, V]`` logits: they stream vocab blocks with an
    online log-sum-exp (forward) and recompute them (backward). Triton: forward O(N) float32; backward
    one gradient chunk plus a float32 d(hidden) accumulator — within 1 % of the ``[N, V]`` float32
    logits for a frozen (LoRA) head at N ≥ 4096, V = 128256, H = 4096; (H + Vc/2)/V of them for a
    trained one (exact: :func:`signalrl.kernels.linear_logprobs.backward_plan`). Native: one block of
    logits per thread. The reference materializes ``[N, V]`` float32 logits.
    """
    v.linear_head(hidden, weight, targets, bias)
    H = hidden.shape[-1]
    temperature = v.positive("temperature", temperature)
    ignore_index = v.index("ignore_index", ignore_index)
    return_entropy = v.flag("return_entropy", return_entropy)
    v.targets_in_range(targets, weight.shape[0], ignore_index)
    lead = targets.shape
    backend = backend_for("linear_logprobs", "linear_token_logprobs_fwd", hidden)
    if hidden.dtype == torch.float64 or targets.numel() == 0:
        backend = "reference"

    def ref_fn(h, w, t, b):
        return reference.linear_token_logprobs(
            h, w, t, bias=b, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )

    if backend == "reference":
        return ref_fn(hidden, weight, targets, bias)

    h = hidden.reshape(-1, H).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()

    def fast_fn(h, w, t, b):
        lp, ent, _ = _linear_fwd(h, w, b, t, temperature, int(ignore_index), return_entropy, backend)
        return (lp, ent) if return_entropy else lp

    if check_enabled():
        out = checked("linear_token_logprobs", fast_fn, ref_fn, (h, w, t, b), h.dtype)
    else:
        out = fast_fn(h, w, t, b)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)

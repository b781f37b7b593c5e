"""Per-token log-probs (+ entropy) of target tokens straight from hidden states × the LM head:
``linear_token_logprobs``, never materializing the ``[N, V]`` logits (beyond 4 MiB of them: the kept-logits plan).

Family ``linear_logprobs``: the math is :mod:`signalrl.reference.logprobs` (``linear_token_logprobs``), the Triton
kernels :mod:`signalrl.kernels.linear_logprobs`, the C++ kernels ``csrc/cpu/linear_logprobs.cpp``. This module holds
the kernel ops' contract (schemas and fakes) and the public op, which validates, flattens, picks a backend and calls
the kernel op; in check mode every call is compared with the reference in float64, values and gradients.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .. import reference
from ..kernels.params import LogprobParams
from . import _validate as v
from ._backend import backend_for, implements
from ._check import check_enabled, checked
from ._library import KernelOp
from .logprobs import grads_in

_F32 = torch.float32
_F64 = torch.float64

# --- linear_token_logprobs: kernel ops -------------------------------------------------------

_LP = LogprobParams.schema()


def _fwd_fake(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=_F32), hidden.new_empty(n if with_entropy else 0, dtype=_F32),
            hidden.new_empty(n, dtype=_F64))


def grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias):
    """Shapes of ``(grad_hidden | empty, grad_weight | empty, grad_bias | empty)`` (also linear_ppo's backward)."""
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0, dtype=_F32)
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0, dtype=_F32)
    gb = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0, dtype=_F32)
    return gh, gw, gb


def _bwd_fake(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
              need_hidden, need_weight, need_bias):
    return grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)


# hidden [N, H], weight [V, H], bias [V] | None (same dtype), targets [N] int64
#   → (logprobs [N] f32, entropy [N] f32 | empty, lse [N] f64)
LINEAR_FWD = KernelOp(
    "linear_token_logprobs_fwd",
    f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, {_LP}, bool with_entropy) "
    "-> (Tensor, Tensor, Tensor)",
    _fwd_fake,
)
# → (grad_hidden [N, H] | empty, grad_weight [V, H] | empty, grad_bias [V] | empty), by the need_* flags
LINEAR_BWD = KernelOp(
    "linear_token_logprobs_bwd",
    f"(Tensor grad_logprobs, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    f"Tensor lse, Tensor entropy, {_LP}, bool need_hidden, bool need_weight, bool need_bias) "
    "-> (Tensor, Tensor, Tensor)",
    _bwd_fake,
)


@LINEAR_FWD.triton
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    from ..kernels import linear_logprobs  # Triton: imported on first use

    return linear_logprobs.linear_token_logprobs_fwd(hidden, weight, bias, targets, temperature, ignore_index,
                                                     with_entropy)


@LINEAR_BWD.triton
def _(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
      need_hidden, need_weight, need_bias):
    from ..kernels import linear_logprobs

    return linear_logprobs.linear_token_logprobs_bwd(
        grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
        need_hidden, need_weight, need_bias,
    )


def _linear_setup(ctx, inputs, output):
    """Also the kept-logits plan's: its one more input (keep_cols) and output (kept) are kept for the backward."""
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy = inputs[:7]
    lp, ent, lse, *kept = output
    ctx.mark_non_differentiable(lse, *kept)
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, *kept)
    ctx.args = (temperature, ignore_index, with_entropy)


def _linear_backward(ctx, g_lp, g_ent, _g_lse, *_g_kept):
    hidden, weight, bias, targets, lse, ent, *kept = ctx.saved_tensors
    temperature, ignore_index, with_entropy = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_b = bool(need_b and bias is not None)
    g_lp, g_ent = grads_in(g_lp, g_ent, lse, with_entropy)
    ent = ent if g_ent.numel() else lse.new_empty(0, dtype=_F32)
    bwd, kept = (LINEAR_KEPT_BWD, kept) if kept else (LINEAR_BWD, [])
    gh, gw, gb = bwd.variant(ctx.variant)(
        g_lp, g_ent, *kept, hidden, weight, bias, targets, lse, ent, temperature, ignore_index, need_h, need_w,
        need_b,
    )
    no_grad = (None,) * (4 + len(kept))  # targets, temperature, ignore_index, with_entropy (, keep_cols)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + no_grad


LINEAR_FWD.register_autograd(_linear_backward, _linear_setup)


# --- the kept-logits plan (native) ----------------------------------------------------------
# A call whose [N, V] float32 logits are small keeps (the first columns of) them from the forward for the backward,
# which then reads them instead of recomputing their GEMM (csrc/cpu/linear_logprobs.cpp): a step of two GEMMs of
# N·V·H over the kept columns instead of three, within the op's memory bound.

def keep_floats_from_env(env=os.environ) -> int:
    """The floats of logits a call may keep from forward to backward: ``SIGNAL_KEEP_LOGITS_MIB`` MiB of float32
    (≥ 0; 0 turns the plan off), by default 4 MiB (2^20 floats, the native backward's own ``[1024, 1024]`` block)."""
    raw = env.get("SIGNAL_KEEP_LOGITS_MIB", "").strip()
    if not raw:
        return 1 << 20
    try:
        mib = float(raw)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib >= 0):
        raise ValueError(f"SIGNAL_KEEP_LOGITS_MIB: expected a number of MiB >= 0, got {raw!r}")
    return int(mib * (1 << 20)) // 4


#: floats of logits a call keeps from forward to backward at most (:func:`keep_floats_from_env`, read at import)
KEEP_FLOATS = keep_floats_from_env()


def keep_columns(rows: int, vocab: int) -> int:
    """The logit columns the kept-logits plan keeps for ``rows`` rows over a ``vocab``-wide head: all of them when
    rows·vocab ≤ :data:`KEEP_FLOATS`, else the most multiples of 64 that fit (0: the plan does not apply)."""
    if rows * vocab <= KEEP_FLOATS:
        return vocab
    return KEEP_FLOATS // max(rows, 1) // 64 * 64


def _kept_fake(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, keep_cols):
    return _fwd_fake(hidden, weight, bias, targets, temperature, ignore_index, with_entropy) + (
        hidden.new_empty((hidden.shape[0], keep_cols), dtype=_F32),)


# the forward's arguments and keep_cols ≤ V → (logprobs, entropy | empty, lse, kept [N, keep_cols] f32: row k holds
# the first keep_cols raw logits (hidden·weightᵀ + bias) of the k-th row whose target is not ignore_index)
LINEAR_KEPT_FWD = KernelOp(
    "linear_token_logprobs_kept_fwd",
    f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, {_LP}, bool with_entropy, int keep_cols) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _kept_fake,
)
# the backward's arguments with the forward's kept logits → the backward's gradients
LINEAR_KEPT_BWD = KernelOp(
    "linear_token_logprobs_kept_bwd",
    f"(Tensor grad_logprobs, Tensor grad_entropy, Tensor kept, Tensor hidden, Tensor weight, Tensor? bias, "
    f"Tensor targets, Tensor lse, Tensor entropy, {_LP}, bool need_hidden, bool need_weight, bool need_bias) "
    "-> (Tensor, Tensor, Tensor)",
    lambda grad_logprobs, grad_entropy, kept, *rest: _bwd_fake(grad_logprobs, grad_entropy, *rest),
)


LINEAR_KEPT_FWD.register_autograd(_linear_backward, _linear_setup)


def kept_plan(hidden: Tensor, weight: Tensor, bias: Tensor | None, backend: str,
              kernel: KernelOp = LINEAR_KEPT_FWD) -> int:
    """The columns the kept-logits plan keeps for this call (0: it does not serve it): some gradient is needed (grad
    mode on), ``backend`` has ``kernel`` (the plan's forward) and :func:`keep_columns` of ``[N, V]`` is not 0."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return 0
    if not implements(kernel.name, backend):
        return 0
    return keep_columns(hidden.numel() // max(hidden.shape[-1], 1), weight.shape[0])


# --- the frozen-head plan (native) ----------------------------------------------------------
# A LoRA run's LM head gets no gradient: then d log p_t / d hidden = (c·W_t − pw) / T with c = Σ_{j≠t} p_j and
# pw = Σ_{j≠t} p_j·W_j per row, which the forward computes beside the log-sum-exp
# (csrc/cpu/linear_logprobs_frozen.cpp): two GEMMs over the vocabulary forward and none backward, instead of one
# forward and two backward.


def _frozen_fake(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    n, h = hidden.shape
    return (hidden.new_empty(n, dtype=_F32), hidden.new_empty(n if with_entropy else 0, dtype=_F32),
            hidden.new_empty((n, h), dtype=_F32), hidden.new_empty(n, dtype=_F32))


# hidden [N, H], weight [V, H], bias [V] | None (same dtype), targets [N] int64
#   → (logprobs [N] f32, entropy [N] f32 | empty (a value: no entropy gradient), pw [N, H] f32: Σ_{j≠t} p_ij·weight_j,
#      c [N] f32: Σ_{j≠t} p_ij; pw and c are 0 on rows whose target is ignore_index or outside [0, V))
LINEAR_FROZEN_FWD = KernelOp(
    "linear_token_logprobs_frozen_fwd",
    f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, {_LP}, bool with_entropy) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _frozen_fake,
)


# → grad_hidden [N, H] f32 = (c·weight[targets] − pw)·grad_logprobs / T, 0 on rows whose target is outside [0, V)
LINEAR_FROZEN_BWD = KernelOp(
    "linear_token_logprobs_frozen_bwd",
    "(Tensor grad_logprobs, Tensor weight, Tensor targets, Tensor pw, Tensor coef, float temperature) -> Tensor",
    lambda grad_logprobs, weight, targets, pw, coef, temperature: torch.empty_like(pw),
)


def _frozen_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy = inputs
    _, ent, pw, c = output
    ctx.mark_non_differentiable(ent, pw, c)
    ctx.save_for_backward(weight, targets, pw, c)
    ctx.args = (temperature, hidden.dtype)


def _frozen_backward(ctx, g_lp, _g_ent, _g_pw, _g_c):
    weight, targets, pw, c = ctx.saved_tensors
    temperature, dtype = ctx.args
    if g_lp is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    grad_hidden = LINEAR_FROZEN_BWD.variant(ctx.variant)(g_lp.to(_F32).contiguous(), weight, targets, pw, c,
                                                         temperature)
    return (grad_hidden.to(dtype),) + (None,) * 6


LINEAR_FROZEN_FWD.register_autograd(_frozen_backward, _frozen_setup)


def frozen_head_plan(hidden: Tensor, weight: Tensor, bias: Tensor | None, backend: str,
                     kernel: KernelOp = LINEAR_FROZEN_FWD) -> bool:
    """Whether the frozen-head plan serves this call: ``hidden`` needs a gradient and neither ``weight`` nor ``bias``
    does (grad mode on), and ``backend`` has ``kernel`` (the plan's forward). Without any gradient the plain forward
    is cheaper (one GEMM over the vocabulary, not two)."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and implements(kernel.name, backend))


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
    Memory: the fused backends never hold the ``[N, V]`` logits beyond 4 MiB: they stream vocab blocks
    with an online log-sum-exp (forward) and recompute them (backward). Triton: forward O(N) float32; backward
    one gradient chunk plus a float32 d(hidden) accumulator — within 1 % of the ``[N, V]`` float32
    logits for a frozen (LoRA) head at N ≥ 4096, V = 128256, H = 4096; (H + Vc/2)/V of them for a
    trained one (exact: :func:`signalrl.kernels.linear_logprobs.backward_plan`). Native: one block of
    logits per thread, and at most :data:`KEEP_FLOATS` floats (4 MiB by default) of them kept from
    forward to backward (the plan below). The reference materializes ``[N, V]`` float32 logits.

    Plan: when ``hidden`` needs a gradient and the head does not (``weight`` and ``bias`` frozen, as in LoRA) and no
    entropy is asked for, the native backend computes pw = Σ_{j≠t} p_j·weight_j and c = Σ_{j≠t} p_j per row beside
    the log-sum-exp (a second GEMM per vocab block) and keeps them, ``[N, H]`` and ``[N]`` float32, for the
    backward: d hidden = (c·weight_t − pw)·g / T, no pass over the vocabulary (two GEMMs of N·V·H in all instead of
    three). Otherwise, when a gradient is needed, the native backend keeps the first K columns of the float32 logits
    from the forward for the backward, K = :func:`keep_columns` (all V when N·V ≤ :data:`KEEP_FLOATS`, 4 MiB unless
    ``SIGNAL_KEEP_LOGITS_MIB`` says otherwise), and recomputes only the others (two GEMMs over the kept columns
    instead of three).
    """
    v.linear_head(hidden, weight, targets, bias)
    H = hidden.shape[-1]
    temperature = v.positive("temperature", temperature)
    ignore_index = v.index("ignore_index", ignore_index)
    return_entropy = v.flag("return_entropy", return_entropy)
    v.targets_in_range(targets, weight.shape[0], ignore_index)
    lead = targets.shape
    backend = backend_for(LINEAR_FWD, hidden)
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

    params = LogprobParams(temperature, int(ignore_index))
    if not return_entropy and frozen_head_plan(hidden, weight, bias, backend):
        frozen = LINEAR_FROZEN_FWD.op(backend, h.device)

        def fast_fn(h, w, t, b):
            return frozen(h, w, b, t, *params.flat(), False)[0]
    else:
        keep_cols = kept_plan(hidden, weight, bias, backend)
        plan = (keep_cols,) if keep_cols else ()  # the kept-logits plan's one more argument
        op = (LINEAR_KEPT_FWD if keep_cols else LINEAR_FWD).op(backend, h.device)

        def fast_fn(h, w, t, b):
            lp, ent = op(h, w, b, t, *params.flat(), return_entropy, *plan)[:2]
            return (lp, ent) if return_entropy else lp

    if check_enabled():
        out = checked("linear_token_logprobs", fast_fn, ref_fn, (h, w, t, b), h.dtype)
    else:
        out = fast_fn(h, w, t, b)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)

"""PPO objectives: the clipped policy surrogate and the clipped value loss.

Family ``ppo``: the math is :mod:`signalrl.reference.ppo`, the Triton kernels :mod:`signalrl.kernels.ppo`, the C++
kernels ``csrc/cpu/ppo.cpp``. This module holds the kernel ops' contract (schemas and fakes) and the public ops, which
validate their arguments, turn the aggregation into per-token weights
(:func:`signalrl.reference.aggregate.token_weights`: every aggregation is Σ_i w_i·ℓ_i), pick a backend and call a
kernel op whose forward computes the loss, its per-token gradient and the statistics in one pass; the backward is
one multiply. In check mode every call is compared with the reference in float64, values and gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..reference.aggregate import AGGREGATIONS, token_weights
from ..kernels.params import PPOParams, ValueParams
from ..reference.stat_keys import PPO_STAT_KEYS, SURROGATE_STAT_KEYS, VALUE_STAT_KEYS
from . import _validate as v
from ._backend import backend_for
from ._check import check_enabled, checked
from ._library import KernelOp, NativeHelper

_F32 = torch.float32


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1).contiguous()


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == _F32 else x.to(_F32)


def _weights(mask: Tensor | None, aggregation: str, like: Tensor) -> Tensor:
    """The kernels' ``weights`` argument: empty for token-mean (the kernel forms m / max(Σm, 1) itself, without a
    weights tensor), else :func:`token_weights` flattened."""
    if aggregation == "token-mean":
        return like.new_empty(0, dtype=_F32)
    return _flat(token_weights(mask, aggregation, shape=like.shape, device=like.device))


_SURROGATE_PARAMS: dict[tuple, tuple] = {}


def _surrogate_params(clip_low, clip_high, dual_clip, log_ratio_clamp) -> tuple:
    """``PPOParams(...).flat()`` of clipped_surrogate (no KL, no entropy term), built once per setting in eager."""
    key = (clip_low, clip_high, dual_clip, log_ratio_clamp)
    flat = None if torch.compiler.is_compiling() else _SURROGATE_PARAMS.get(key)
    if flat is None:
        flat = PPOParams(clip_low, clip_high, dual_clip, log_ratio_clamp=log_ratio_clamp).flat()
        if not torch.compiler.is_compiling() and len(_SURROGATE_PARAMS) < 256:
            _SURROGATE_PARAMS[key] = flat
    return flat


def _any_f64(*xs: Tensor) -> bool:
    """A float64 input makes a float64 result: such calls run the reference on every backend."""
    return any(x is not None and x.dtype == torch.float64 for x in xs)


def _kernel_checks_mask(backend: str, mask: Tensor | None) -> bool:
    """Whether the native kernel checks the mask's values itself (in its pass over the mask, raising ValueError on a
    bad one): a float32 mask on the native backend, outside torch.compile tracing. Other masks are checked by
    :func:`signalrl.ops._validate.mask_values` before the call."""
    return backend == "native" and mask is not None and mask.dtype == _F32 and not torch.compiler.is_compiling()


def _checking_mask(op, args: tuple, mask: Tensor):
    """``op(*args)``, a native kernel that checks its mask: on its ValueError the mask is checked again in Python,
    which names the first bad value and where it is."""
    try:
        return op(*args)
    except ValueError:
        v.mask_values("mask", mask)
        raise


def _check_per_token(name: str, x, ref_name: str, ref: Tensor) -> Tensor:
    v.tensor(name, x, dtypes=v.FLOAT_DTYPES)
    v.same_shape(name, x, ref_name, ref)
    v.same_device(name, x, ref_name, ref)
    return x


# --- kernel ops ----------------------------------------------------------------------------------


def _ppo_fake(logprobs, old_logprobs, advantages, weights, mask, ref_logprobs, entropy, *params):
    n = logprobs.shape[0]
    has_ent = entropy is not None and entropy.numel() > 0
    return (logprobs.new_empty((), dtype=_F32), logprobs.new_empty(n, dtype=_F32),
            logprobs.new_empty(n if has_ent else 0, dtype=_F32), logprobs.new_empty(len(PPO_STAT_KEYS), dtype=_F32))


def _value_fake(values, old_values, returns, weights, mask, clip):
    n = values.shape[0]
    return (values.new_empty((), dtype=_F32), values.new_empty(n, dtype=_F32),
            values.new_empty(len(VALUE_STAT_KEYS), dtype=_F32))


# [N] vectors (float, read as float32; weights = the aggregation's per-token weights, or empty for token-mean's
# m / max(Σm, 1), which the kernel computes; mask 0/1 selects),
# ref_logprobs / entropy None or empty when absent
#   → (loss [] f32, grad_logprobs [N] f32, grad_entropy [N] f32 | empty, stats [9] f32 in PPO_STAT_KEYS order)
PPO_TOKEN_FWD = KernelOp(
    "ppo_token_fwd",
    "(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor weights, Tensor mask, Tensor? ref_logprobs, "
    f"Tensor? entropy, {PPOParams.schema()}) -> (Tensor, Tensor, Tensor, Tensor)",
    _ppo_fake,
)
# [N] vectors (weights as above: empty = token-mean) → (loss [] f32, grad_values [N] f32, stats [4] f32 in
# VALUE_STAT_KEYS order)
VALUE_LOSS_FWD = KernelOp(
    "value_loss_fwd",
    f"(Tensor values, Tensor old_values, Tensor returns, Tensor weights, Tensor mask, {ValueParams.schema()}) "
    "-> (Tensor, Tensor, Tensor)",
    _value_fake,
)


def _weights_for(weights: Tensor, mask: Tensor) -> Tensor:
    """Empty weights stand for the token-mean weights of the mask (the native kernels compute them in place)."""
    return token_weights(mask, "token-mean") if weights.numel() == 0 and mask.numel() > 0 else weights


@PPO_TOKEN_FWD.triton
def _(logprobs, old_logprobs, advantages, weights, mask, ref_logprobs, entropy, *params):
    from ..kernels import ppo  # Triton: imported on first use

    weights = _weights_for(weights, mask)
    return ppo.ppo_token_fwd(logprobs, old_logprobs, advantages, weights, mask, ref_logprobs, entropy, *params)


@VALUE_LOSS_FWD.triton
def _(values, old_values, returns, weights, mask, clip):
    from ..kernels import ppo

    return ppo.value_loss_fwd(values, old_values, returns, _weights_for(weights, mask), mask, clip)


# The forward kernels compute the per-token gradient of the loss; the backward scales it by the incoming gradient:
# on CPU with the native extension by its helper op (one thread for small N, where an ATen multiply would split
# across every thread and wait for a busy core; the same float32 products), else by a torch multiply.
GRAD_SCALE = NativeHelper("ppo_grad_scale", "(Tensor grad, Tensor grad_loss) -> Tensor",
                          lambda grad, grad_loss: torch.empty_like(grad))


def _scaled(g: Tensor, g_loss: Tensor) -> Tensor:
    if g.device.type == "cpu" and g.dim() == 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        native_scale = GRAD_SCALE()
        if native_scale is not None and g.dtype == _F32 and g_loss.device.type == "cpu" and g_loss.numel() == 1:
            return native_scale(g, g_loss)
    return g * g_loss


def _ppo_setup(ctx, inputs, output):
    _loss, g_lp, g_ent, stats = output
    ctx.mark_non_differentiable(g_lp, g_ent, stats)
    ctx.set_materialize_grads(False)  # no [N] zeros for the outputs without gradient: the backward reads g_loss only
    ctx.save_for_backward(g_lp, g_ent)
    ctx.dtypes = (inputs[0].dtype, None if inputs[6] is None else inputs[6].dtype)


def _ppo_backward(ctx, g_loss, *_unused):
    g_lp, g_ent = ctx.saved_tensors
    lp_dtype, ent_dtype = ctx.dtypes
    rest = (None,) * (5 + PPOParams.size())
    if g_loss is None:
        return (None, *rest, None)
    grad_ent = _scaled(g_ent, g_loss).to(ent_dtype) if ctx.needs_input_grad[6] and g_ent.numel() else None
    return (_scaled(g_lp, g_loss).to(lp_dtype), None, None, None, None, None, grad_ent) + rest[5:]


PPO_TOKEN_FWD.register_autograd(_ppo_backward, _ppo_setup)


def _value_setup(ctx, inputs, output):
    _loss, g_v, stats = output
    ctx.mark_non_differentiable(g_v, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_v)
    ctx.v_dtype = inputs[0].dtype


def _value_backward(ctx, g_loss, _g_gv, _g_stats):
    (g_v,) = ctx.saved_tensors
    grad = _scaled(g_v, g_loss).to(ctx.v_dtype) if g_loss is not None else None
    return grad, None, None, None, None, None


VALUE_LOSS_FWD.register_autograd(_value_backward, _value_setup)


# --- clipped_surrogate: public op -----------------------------------------------------------


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    log_ratio_clamp: float | None = None,
):
    """PPO clipped policy surrogate with per-token advantages.

    Args:
        logprobs: ``[B, T]`` (or ``[..., T]``; 1-D is one row) log π_θ of the sampled tokens;
            float32, bfloat16 or float16 (float64 runs the reference). An empty batch (any size 0) is an
            all-masked one: loss and stats 0.
        old_logprobs, advantages: same shape and device, any float dtype (read as float32; a float64 one makes
            the result float64 and runs the reference).
        mask: optional ``[B, T]``, 1 (or True) where a token counts; values are weights, finite and ≥ 0
            (0 = not counted, 0.5 = half a token); a negative, NaN or inf value is a ``ValueError`` on CPU
            (not checked on CUDA: that would sync).
            The mask *selects*: whatever a masked position of ``logprobs``, ``old_logprobs`` or
            ``advantages`` holds (NaN, ±inf), loss, stats and gradients equal those with zeros there, and
            the gradient there is exactly 0.
        clip_low, clip_high: the ratio is clipped to ``[1 − clip_low, 1 + clip_high]``;
            ``clip_high`` defaults to ``clip_low`` (set it higher for DAPO's clip-higher).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by −A·c (dual-clip PPO).
        aggregation: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean`` or
            ``seq-mean-token-sum-norm`` (see :func:`signalrl.reference.aggregate`).
        log_ratio_clamp: c > 0 clamps log ρ = logp − old_logp to ``[−c, c]`` before the exp, with zero
            gradient where the clamp is active (``torch.clamp``; verl clamps to ±20); the default None
            does not clamp. Without it a token with A < 0 and log ρ ≳ 89 gives ρ = inf and an infinite loss.

    Returns:
        ``(loss, stats)``: the aggregated loss, a 0-d float32 tensor, and 0-d float32 stats
        ``clip_fraction``, ``dual_clip_fraction``, ``approx_kl`` (mean of ρ − 1 − log ρ),
        ``ratio_mean``, ``ratio_min``, ``ratio_max`` over counted tokens, with ρ after the clamp
        (no host sync).

    Math: ρ = exp(clamp(logp − old_logp)), ℓ = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)), with
    dual-clip ℓ = min(ℓ, −A·c) where A < 0; loss = Σ w·ℓ with the aggregation's weights w. A token with
    A = 0 contributes exactly 0 and zero gradient, whatever its ratio (even ρ = inf: no 0·inf = NaN).
    Gradient flows to ``logprobs`` only (old log-probs and advantages are constants).
    Memory: the fused backend keeps one ``[N]`` float32 per-token gradient between forward and
    backward (it is computed in the forward pass) and a few hundred floats of partial statistics.
    """
    v.tensor("logprobs", logprobs, dtypes=v.FLOAT_DTYPES, min_dim=1)
    _check_per_token("old_logprobs", old_logprobs, "logprobs", logprobs)
    _check_per_token("advantages", advantages, "logprobs", logprobs)
    v.optional_mask("mask", mask, "logprobs", logprobs)
    clip_low, clip_high, dual_clip = v.clip_range(clip_low, clip_high, dual_clip)
    v.choice("aggregation", aggregation, AGGREGATIONS)
    log_ratio_clamp = v.optional_positive("log_ratio_clamp", log_ratio_clamp)
    v.mask_values("mask", mask)

    def ref_fn(lp, old, adv, m):
        return reference.clipped_surrogate(
            lp, old, adv, m, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation,
            log_ratio_clamp=log_ratio_clamp,
        )

    backend = backend_for(PPO_TOKEN_FWD, logprobs)
    if _any_f64(logprobs, old_logprobs, advantages) or logprobs.numel() == 0:
        backend = "reference"
    if backend == "reference":
        return ref_fn(logprobs, old_logprobs, advantages, mask)

    op = PPO_TOKEN_FWD.op(backend, logprobs.device)
    flat_params = _surrogate_params(clip_low, clip_high, dual_clip, log_ratio_clamp)

    def fast_fn(lp, old, adv, m):
        w = _weights(m, aggregation, lp)
        m32 = torch.ones(lp.numel(), dtype=_F32, device=lp.device) if m is None else _flat(_f32(m))
        loss, _, _, stats = op(_flat(lp), _flat(old), _flat(adv), w, m32, None, None, *flat_params)
        return loss, dict(zip(SURROGATE_STAT_KEYS, stats.unbind(0)))  # the first len(SURROGATE_STAT_KEYS) stats

    inputs = (logprobs, old_logprobs, advantages, mask)
    if check_enabled():
        return checked("clipped_surrogate", fast_fn, ref_fn, inputs, logprobs.dtype)
    return fast_fn(*inputs)


# --- value_loss: public op ------------------------------------------------------------------


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    *,
    clip: float | None = None,
    aggregation: str = "token-mean",
):
    """Clipped value-function loss.

    Args:
        values: ``[B, T]`` (or ``[..., T]``) predictions of the value head; float32, bfloat16 or
            float16 (float64 runs the reference). An empty batch gives loss and stats 0.
        old_values, returns: same shape and device, any float dtype (read as float32; float64 runs the
            reference and gives float64).
        mask: optional ``[B, T]``, 1 (or True) where a token counts; weights ≥ 0 as in
            :func:`clipped_surrogate`. It *selects*: whatever a masked
            position of ``values``, ``old_values`` or ``returns`` holds (NaN, ±inf), loss, stats and
            gradients equal those with zeros there (the gradient there is exactly 0).
        clip: c > 0 clips the new prediction to ``old_values ± c``; None disables clipping.
        aggregation: as in :func:`clipped_surrogate`.

    Returns:
        ``(loss, stats)``: 0-d float32 loss and 0-d float32 stats ``value_clip_fraction``,
        ``explained_variance`` (1 − Var(R − v)/Var(R) over counted tokens, 0 when Var(R) = 0),
        ``value_mean``, ``return_mean``.

    Math: v_c = old + clip(v − old, −c, c), ℓ = ½·max((v − R)², (v_c − R)²) (½·(v − R)² without
    clip); loss = Σ w·ℓ. A token counts as clipped when |v − old| > c and the clipped error is the
    larger one. Gradient flows to ``values`` only.
    Memory: one ``[N]`` float32 per-token gradient kept from forward to backward.
    """
    v.tensor("values", values, dtypes=v.FLOAT_DTYPES, min_dim=1)
    _check_per_token("old_values", old_values, "values", values)
    _check_per_token("returns", returns, "values", values)
    v.optional_mask("mask", mask, "values", values)
    if clip is not None:
        clip = v.positive("clip", clip)
    v.choice("aggregation", aggregation, AGGREGATIONS)

    def ref_fn(val, old, ret, m):
        return reference.value_loss(val, old, ret, m, clip=clip, aggregation=aggregation)

    backend = backend_for(VALUE_LOSS_FWD, values)
    if _any_f64(values, old_values, returns) or values.numel() == 0:
        backend = "reference"
    kernel_checks_mask = _kernel_checks_mask(backend, mask)
    if not kernel_checks_mask:
        v.mask_values("mask", mask)
    if backend == "reference":
        return ref_fn(values, old_values, returns, mask)

    op = VALUE_LOSS_FWD.op(backend, values.device)
    params = ValueParams(clip)

    def fast_fn(val, old, ret, m):
        w = _weights(m, aggregation, val)
        m32 = torch.ones(val.numel(), dtype=_F32, device=val.device) if m is None else _flat(_f32(m))
        args = (_flat(val), _flat(old), _flat(ret), w, m32, *params.flat())
        loss, _, stats = _checking_mask(op, args, m) if kernel_checks_mask else op(*args)
        return loss, dict(zip(VALUE_STAT_KEYS, stats.unbind(0)))

    inputs = (values, old_values, returns, mask)
    if check_enabled():
        return checked("value_loss", fast_fn, ref_fn, inputs, values.dtype)
    return fast_fn(*inputs)

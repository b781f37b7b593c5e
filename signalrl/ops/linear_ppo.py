"""The PPO policy loss straight from hidden states and the LM head: ``linear_ppo_loss``.

Family ``linear_ppo``: the math is :func:`signalrl.reference.linear_ppo_loss` (the composition
linear_token_logprobs → kl_penalty → clipped_surrogate, also the ground truth of check mode), the Triton kernels
:mod:`signalrl.kernels.linear_ppo`, the C++ kernels ``csrc/cpu/linear_ppo.cpp``. This module holds the kernel ops'
contract (schemas and fakes) and the public op: validation → per-token weights
(:func:`signalrl.reference.aggregate.token_weights`) → backend choice → the kernel op, whose forward makes one pass
over vocab tiles (PPO epilogue, statistics, per-token gradient coefficients) and whose backward recomputes the
tiles.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..reference.aggregate import AGGREGATIONS, token_weights
from ..reference.kl import KL_ESTIMATORS
from ..reference.stat_keys import PPO_STAT_KEYS as STAT_KEYS
from ..kernels.params import LogprobParams, PPOParams
from . import _validate as v
from ._backend import backend_for
from ._check import check_enabled, checked
from ._library import KernelOp
from .linear_logprobs import LINEAR_FROZEN_BWD, LINEAR_KEPT_BWD, frozen_head_plan, grads_fake, kept_plan

_F32 = torch.float32


def _flat32(x: Tensor) -> Tensor:
    return x.reshape(-1).to(_F32).contiguous()


# --- kernel ops ----------------------------------------------------------------------------------

_ARGS = f"{LogprobParams.schema()}, {PPOParams.schema()}"


def _fwd_fake(hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs, *params):
    n = hidden.shape[0]
    entropy_coef = PPOParams(*params[2:]).entropy_coef

    def vec(k):
        return hidden.new_empty(k, dtype=_F32)

    return (hidden.new_empty((), dtype=_F32), vec(len(STAT_KEYS)), vec(n), vec(n),
            hidden.new_empty(n, dtype=torch.float64), vec(n), vec(n if entropy_coef else 0))


def _bwd_fake(grad_loss, g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
              need_hidden, need_weight, need_bias):
    return grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)


# hidden [N, H], weight [V, H], bias [V] | None, targets [N] int64, old_logprobs, advantages, weights, mask [N] f32,
# ref_logprobs [N] f32 | empty → (loss [] f32, stats [9] f32 (PPO_STAT_KEYS), logprobs [N] f32, entropy [N] f32,
# lse [N] f64, g_lp [N] f32, g_ent [N] f32 | empty (empty when entropy_coef == 0))
LINEAR_PPO_FWD = KernelOp(
    "linear_ppo_fwd",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor old_logprobs, Tensor advantages, "
    f"Tensor weights, Tensor mask, Tensor? ref_logprobs, {_ARGS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fwd_fake,
)
# grad_loss [] f32, the forward's g_lp, g_ent, lse, entropy → (grad_hidden | empty, grad_weight | empty,
# grad_bias | empty), by the need_* flags
LINEAR_PPO_BWD = KernelOp(
    "linear_ppo_bwd",
    "(Tensor grad_loss, Tensor g_lp, Tensor g_ent, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
    f"Tensor lse, Tensor entropy, {LogprobParams.schema()}, bool need_hidden, bool need_weight, bool need_bias) "
    "-> (Tensor, Tensor, Tensor)",
    _bwd_fake,
)


@LINEAR_PPO_FWD.triton
def _(hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs, *params):
    from ..kernels import linear_ppo  # Triton: imported on first use

    loss, stats, lp, ent, lse, g_lp, g_ent = linear_ppo.linear_ppo_fwd(
        hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs, *params
    )
    return loss.clone(), stats, lp, ent, lse, g_lp, g_ent


@LINEAR_PPO_BWD.triton
def _(grad_loss, g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
      need_hidden, need_weight, need_bias):
    from ..kernels import linear_ppo

    return linear_ppo.linear_ppo_bwd(grad_loss, g_lp, g_ent, hidden, weight, bias, targets, lse, entropy,
                                     temperature, ignore_index, need_hidden, need_weight, need_bias)


def _setup(ctx, inputs, output):
    """Also the kept-logits plan's: its one more input (keep_cols) and output (kept) are kept for the backward."""
    hidden, weight, bias, targets = inputs[:4]
    ctx.logprob_params = inputs[9:11]  # temperature, ignore_index
    _loss, stats, lp, ent, lse, g_lp, g_ent, *kept = output
    ctx.mark_non_differentiable(stats, lp, ent, lse, g_lp, g_ent, *kept)
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, g_lp, g_ent, *kept)


def _backward(ctx, g_loss, *_unused):
    hidden, weight, bias, targets, lse, ent, g_lp, g_ent, *kept = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_b = bool(need_b and bias is not None)
    none_rest = (None,) * (6 + len(kept) + LogprobParams.size() + PPOParams.size())
    if g_loss is None or not (need_h or need_w or need_b):
        return (None, None, None) + none_rest
    ent = ent if g_ent.numel() else g_lp.new_empty(0)
    g_loss = g_loss.to(_F32).contiguous()
    if kept:  # the kept-logits plan: the linear_logprobs backward with the coefficients times grad_loss
        scale = g_loss.reshape(())
        gh, gw, gb = LINEAR_KEPT_BWD.variant(ctx.variant)(
            g_lp * scale, g_ent * scale, *kept, hidden, weight, bias, targets, lse, ent, *ctx.logprob_params,
            need_h, need_w, need_b,
        )
    else:
        gh, gw, gb = LINEAR_PPO_BWD.variant(ctx.variant)(
            g_loss, g_lp, g_ent, hidden, weight, bias, targets, lse, ent, *ctx.logprob_params, need_h, need_w,
            need_b,
        )
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + none_rest


LINEAR_PPO_FWD.register_autograd(_backward, _setup)


# The kept-logits plan (native; see linear_token_logprobs): the same inputs and keep_cols → linear_ppo_fwd's outputs
# and kept [N, keep_cols] f32 (the first keep_cols logits of each row whose target is not ignore_index); backward
# linear_token_logprobs_kept_bwd with g_lp and g_ent times grad_loss.
LINEAR_PPO_KEPT_FWD = KernelOp(
    "linear_ppo_kept_fwd",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor old_logprobs, Tensor advantages, "
    f"Tensor weights, Tensor mask, Tensor? ref_logprobs, {_ARGS}, int keep_cols) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    lambda hidden, *args: _fwd_fake(hidden, *args[:-1]) + (hidden.new_empty((hidden.shape[0], args[-1]),
                                                                             dtype=_F32),),
)


LINEAR_PPO_KEPT_FWD.register_autograd(_backward, _setup)


# The frozen-head plan (native, entropy_coef == 0; see linear_token_logprobs): the same inputs → (loss, stats,
# logprobs, entropy, g_lp, pw [N, H] f32, c [N] f32); backward d hidden = grad_loss·g_lp·(c·W_t − pw) / T.
def _frozen_fwd_fake(hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs, *params):
    n, h = hidden.shape
    vec = lambda k: hidden.new_empty(k, dtype=_F32)  # noqa: E731
    return (hidden.new_empty((), dtype=_F32), vec(len(STAT_KEYS)), vec(n), vec(n), vec(n),
            hidden.new_empty((n, h), dtype=_F32), vec(n))


LINEAR_PPO_FROZEN_FWD = KernelOp(
    "linear_ppo_frozen_fwd",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor old_logprobs, Tensor advantages, "
    f"Tensor weights, Tensor mask, Tensor? ref_logprobs, {_ARGS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _frozen_fwd_fake,
)


def _frozen_setup(ctx, inputs, output):
    hidden, weight, _bias, targets = inputs[:4]
    ctx.args = (inputs[9], hidden.dtype)  # temperature
    _loss, stats, lp, ent, g_lp, pw, c = output
    ctx.mark_non_differentiable(stats, lp, ent, g_lp, pw, c)
    ctx.save_for_backward(weight, targets, g_lp, pw, c)


def _frozen_backward(ctx, g_loss, *_unused):
    weight, targets, g_lp, pw, c = ctx.saved_tensors
    temperature, dtype = ctx.args
    none_rest = (None,) * (8 + LogprobParams.size() + PPOParams.size())
    if g_loss is None or not ctx.needs_input_grad[0]:
        return (None,) + none_rest
    gh = LINEAR_FROZEN_BWD.variant(ctx.variant)(g_lp * g_loss.to(_F32), weight, targets, pw, c, temperature)
    return (gh.to(dtype),) + none_rest


LINEAR_PPO_FROZEN_FWD.register_autograd(_frozen_backward, _frozen_setup)


# --- public op ----------------------------------------------------------------------------------


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    log_ratio_clamp: float | None = None,
):
    """The PPO policy loss from final hidden states and the LM head, without materializing the logits.

    Args:
        hidden: ``[B, T, H]`` (any leading dims; ``[N, H]`` is one row) float32, bfloat16 or float16
            (float64 runs the reference); H ≥ 1. An empty batch is an all-masked one: loss and stats 0.
        weight: ``[V, H]`` LM head (V ≥ 1), same dtype and device as ``hidden``; bias: optional ``[V]``, same dtype.
        targets: ``[B, T]`` int64/int32 sampled token ids in ``[0, V)``, or ``ignore_index`` (such tokens do not
            count); other values: as in :func:`signalrl.ops.token_logprobs` (ValueError on CPU, NaN on CUDA).
        old_logprobs, advantages: ``[B, T]`` float (read as float32): log π_old of the targets and per-token
            advantages (e.g. GAE). A float64 one (or ``ref_logprobs``) makes loss and stats float64 on every backend
            (the fused backends compute in float32 and convert).
        mask: optional ``[B, T]``, 1 where a token counts (combined with ``targets != ignore_index``); weights ≥ 0
            as in :func:`signalrl.ops.clipped_surrogate`. The counted
            tokens *select*: whatever ``old_logprobs``, ``advantages`` or ``ref_logprobs`` hold elsewhere (NaN,
            ±inf), loss, stats and gradients equal those with zeros there.
        ref_logprobs: optional ``[B, T]`` log π_ref for the KL penalty (``kl`` stat is 0 without it).
        temperature: T > 0, logits are divided by it.
        clip_low, clip_high, dual_clip: the ratio clip ``[1 − clip_low, 1 + clip_high]`` (``clip_high``
            defaults to ``clip_low``) and the dual-clip bound c > 1 for negative advantages.
        kl_coef, kl_estimator: KL penalty weight and estimator (``k1``, ``k2``, ``k3``, ``abs``).
        entropy_coef: entropy bonus weight.
        aggregation: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``.
        log_ratio_clamp: c > 0 clamps log ρ = logp − old to ``[−c, c]`` before the exp (zero gradient where the
            clamp is active; verl uses 20); None (default): no clamp. As in :func:`signalrl.ops.clipped_surrogate`.

    Returns:
        ``(loss, stats)``: a 0-d float32 loss (differentiable in hidden, weight, bias) and 0-d float32 stats
        ``clip_fraction``, ``dual_clip_fraction``, ``approx_kl``, ``ratio_mean``, ``ratio_min``, ``ratio_max``,
        ``pg_loss``, ``entropy``, ``kl`` (means over counted tokens; no host sync).

    Math: z = (hidden @ weight.T + bias) / T, logp = z_t − logsumexp(z), H = −Σ p log p, ρ = exp(logp − old),
    ℓ_pg = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)) (dual clip: min(ℓ_pg, −A·c) where A < 0; 0 with zero
    gradient where A = 0, whatever ρ),
    loss = agg(ℓ_pg) + kl_coef·agg(KL(logp, ref)) − entropy_coef·agg(H) — exactly
    :func:`signalrl.reference.linear_ppo_loss`.

    Memory: the fused backends never hold ``[N, V]`` logits beyond 4 MiB (native: the kept-logits plan below).
    Triton: forward O(N) float32; backward one ``[R, Vc]`` gradient chunk (Vc = max(1024, H/2)) plus, for
    non-float32 hidden, a float32 ``[R, H]`` d(hidden) accumulator, where R = N when the head is trained and a row
    chunk keeping it within 1 % of the ``[N, V]`` float32 logits when it is frozen (LoRA). Exact bound: :func:`signalrl.kernels.linear_logprobs.backward_plan`. The reference
    materializes ``[N, V]`` float32 logits.

    Plan: a frozen head (``weight`` and ``bias`` without gradient) with ``entropy_coef == 0`` takes the native
    frozen-head plan of :func:`signalrl.ops.linear_token_logprobs`: the forward keeps pw = Σ_{j≠t} p_j·weight_j
    (``[N, H]`` float32) and the backward makes no pass over the vocabulary. Otherwise, with a gradient, the native
    backend keeps the first columns of the logits for the backward within 4 MiB, as
    :func:`signalrl.ops.linear_token_logprobs` does.
    """
    v.tensor("hidden", hidden, dtypes=v.FLOAT_DTYPES, min_dim=2)  # [N, H] at least: the loss needs a token row
    v.linear_head(hidden, weight, targets, bias)
    H = hidden.shape[-1]
    for name, x in (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs)):
        if x is None and name == "ref_logprobs":
            continue
        v.tensor(name, x, dtypes=v.FLOAT_DTYPES)
        v.same_shape(name, x, "targets", targets)
        v.same_device(name, x, "targets", targets)
    v.optional_mask("mask", mask, "targets", targets)
    temperature = v.positive("temperature", temperature)
    clip_low, clip_high, dual_clip = v.clip_range(clip_low, clip_high, dual_clip)
    kl_coef, entropy_coef = v.finite("kl_coef", kl_coef), v.finite("entropy_coef", entropy_coef)
    v.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    v.choice("aggregation", aggregation, AGGREGATIONS)
    log_ratio_clamp = v.optional_positive("log_ratio_clamp", log_ratio_clamp)
    ignore_index = v.index("ignore_index", ignore_index)
    v.targets_in_range(targets, weight.shape[0], ignore_index)
    v.mask_values("mask", mask)

    def ref_fn(h, w, t, old, adv, m, b, ref):
        return reference.linear_ppo_loss(
            h, w, t, old, adv, m, bias=b, ref_logprobs=ref, temperature=temperature, ignore_index=ignore_index,
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, aggregation=aggregation, log_ratio_clamp=log_ratio_clamp,
        )

    backend = backend_for(LINEAR_PPO_FWD, hidden)
    if hidden.dtype == torch.float64 or targets.numel() == 0:
        backend = "reference"
    # a float64 per-token input makes the reference's result float64; the fused kernel keeps running (the reference
    # would materialize [N, V] logits) and its float32 loss and stats are returned as float64, as the reference's
    out_f64 = torch.float64 in (old_logprobs.dtype, advantages.dtype, getattr(ref_logprobs, "dtype", None))
    inputs = (hidden, weight, targets, old_logprobs, advantages, mask, bias, ref_logprobs)
    if backend == "reference":
        return ref_fn(*inputs)

    plan = ()  # the plain kernel's extra arguments: none
    if entropy_coef == 0.0 and frozen_head_plan(hidden, weight, bias, backend, LINEAR_PPO_FROZEN_FWD):
        kernel = LINEAR_PPO_FROZEN_FWD
    elif keep_cols := kept_plan(hidden, weight, bias, backend, LINEAR_PPO_KEPT_FWD):
        kernel, plan = LINEAR_PPO_KEPT_FWD, (keep_cols,)
    else:
        kernel = LINEAR_PPO_FWD
    op = kernel.op(backend, hidden.device)
    params = LogprobParams(temperature, ignore_index)
    ppo_params = PPOParams(clip_low, clip_high, dual_clip, kl_estimator, kl_coef, entropy_coef, log_ratio_clamp)

    def fast_fn(h, w, t, old, adv, m, b, ref):
        counted = (t != ignore_index).to(_F32)
        if m is not None:
            counted = counted * m.to(_F32)
        wts = token_weights(counted, aggregation)
        h2 = h.reshape(-1, H).contiguous()
        t2 = t.reshape(-1).to(torch.int64).contiguous()
        ref2 = h2.new_empty(0, dtype=_F32) if ref is None else _flat32(ref)
        loss, stats, *_ = op(
            h2, w.contiguous(), None if b is None else b.contiguous(), t2, _flat32(old), _flat32(adv),
            _flat32(wts), _flat32(counted), ref2, *params.flat(), *ppo_params.flat(), *plan,
        )
        if out_f64:
            loss, stats = loss.double(), stats.double()
        return loss, dict(zip(STAT_KEYS, stats.unbind(0)))

    if check_enabled():
        return checked("linear_ppo_loss", fast_fn, ref_fn, inputs, hidden.dtype)
    return fast_fn(*inputs)

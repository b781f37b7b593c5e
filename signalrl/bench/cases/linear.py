"""From hidden states and the LM head: linear_token_logprobs (± entropy) and linear_ppo_loss.

Work model: compute. GEMM-equivalents of 2·N·V·H flops each, the least any implementation does: forward 1 (the
logits), backward 2 (d(hidden), d(weight)), forward+backward 3. The same model is applied to every provider, so its
rate is comparable across providers; a kernel that recomputes the logits in the backward (Signal's fused kernels
beyond the kept columns, `signalrl.ops.linear_token_logprobs`) does more GEMMs than it is credited with.

``linear_token_logprobs:frozen_head`` and ``linear_ppo_loss:frozen_head`` (no entropy bonus) are the LoRA case: the
LM head gets no gradient, only hidden does. Their rows are full steps only (forward + backward): the native plan for
them computes in the forward what its backward needs (see ``signalrl.ops.linear_token_logprobs``, "Plan"), so a
forward or a backward alone would compare nothing. Work model: 2 GEMM-equivalents (the logits, d(hidden)), what a
materializing reference computes.

Peers: Liger-Kernel's LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy's ``linear_cross_entropy``, both with
``reduction="none"`` (per-token −logp under the case's per-token upstream gradient: the task of
linear_token_logprobs; a scalar ``"sum"`` would let a peer form its gradients in the forward) for
linear_token_logprobs;
Liger-Kernel's LigerFusedLinearGRPOLoss for linear_ppo_loss (note: GRPO takes one advantage per
sequence, ours per token).
"""

from __future__ import annotations

import torch

from .. import providers as P
from . import Case, Preset, randint, randn, standard_impls

IGNORE = -100


def _shapes(preset: Preset):
    if preset.quick:
        return [({"N": 64, "H": 32, "V": 500}, torch.float32, True)]
    if preset.name == "cpu":
        pts = [({"N": 128, "H": 256, "V": 32000}, torch.float32, True)]
        pts += [({"N": 128, "H": 256, "V": v}, torch.float32, False) for v in (8192, 65536)]
        pts += [({"N": n, "H": 256, "V": 32000}, torch.float32, False) for n in (32, 512)]
        return pts
    pts = [({"N": 8192, "H": 4096, "V": 128256}, torch.bfloat16, True)]
    pts += [({"N": 8192, "H": 4096, "V": v}, torch.bfloat16, False) for v in (32000, 151936, 262144)]
    pts += [({"N": n, "H": 4096, "V": 128256}, torch.bfloat16, False) for n in (1024, 16384, 32768)]
    pts += [({"N": 8192, "H": h, "V": 128256}, torch.bfloat16, False) for h in (2048, 8192)]
    return pts


def _frozen_shapes(preset: Preset):
    if preset.quick:
        return [({"N": 64, "H": 32, "V": 500}, torch.float32, True)]
    if preset.name == "cpu":
        return [({"N": 128, "H": 256, "V": 32000}, torch.float32, True),
                ({"N": 512, "H": 256, "V": 32000}, torch.float32, False)]
    return [({"N": 8192, "H": 4096, "V": 128256}, torch.bfloat16, True)]


def _flops(N, H, V, frozen=False):
    gemm = 2.0 * N * V * H
    per_mode = {"fwd": 1, "bwd": 1, "full": 2} if frozen else {"fwd": 1, "bwd": 2, "full": 3}
    return lambda mode: per_mode[mode] * gemm


def _maker(N, H, V, dtype, ppo=False, frozen=False):
    def make(device, gen):
        # hidden ~ N(0, 1), weight ~ N(0, 1/H): logits of unit scale, as in a trained LM head
        x = {
            "hidden": randn((N, H), device, gen, dtype=dtype, requires_grad=True),
            "weight": randn((V, H), device, gen, dtype=dtype, scale=H ** -0.5, requires_grad=not frozen),
            "targets": randint(V, (N,), device, gen),
        }
        x["targets"][::16] = IGNORE
        if ppo:
            B = 8 if N % 8 == 0 else 1
            T = N // B
            x = {k: v.reshape(B, T, *v.shape[1:]) if k != "weight" else v for k, v in x.items()}
            x["hidden"] = x["hidden"].detach().requires_grad_(True)
            x["old_logprobs"] = -randn((B, T), device, gen).abs() - 5.0
            x["ref_logprobs"] = x["old_logprobs"] + 0.05 * randn((B, T), device, gen)
            x["advantages"] = randn((B, T), device, gen)
            mask = torch.ones(B, T, device=device)
            mask[:, : T // 8] = 0  # prompt positions do not count
            x["mask"] = mask
        return x

    return make


def _liger_flce(device, x):
    mod = P.require("liger_kernel.transformers")
    if device.type != "cuda":
        raise P.Unavailable("Liger-Kernel runs on CUDA only")
    loss_fn = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")

    def fn(hidden, weight, targets):
        return -loss_fn(weight, hidden, targets)  # −CE = logp, per token: the backward gets a per-token gradient

    return P.Impl(fn, note="Liger FLCE, reduction=none (per-token, as ours; its backward recomputes the chunks)")


def _cce(device, x):
    mod = P.require("cut_cross_entropy")
    if device.type != "cuda":
        raise P.Unavailable("Cut Cross-Entropy's kernels run on CUDA only")

    def fn(hidden, weight, targets):
        return -mod.linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction="none")

    return P.Impl(fn, note="cut_cross_entropy.linear_cross_entropy, reduction=none")


def _liger_grpo(device, x):
    mod = P.require("liger_kernel.chunked_loss")
    if device.type != "cuda":
        raise P.Unavailable("Liger-Kernel runs on CUDA only")
    loss_fn = mod.LigerFusedLinearGRPOLoss(beta=0.05, epsilon_low=0.2, epsilon_high=0.2, use_ref_model=True)

    def fn(hidden, weight, targets, old_logprobs, ref_logprobs, advantages, mask):
        out = loss_fn(
            _input=hidden, lin_weight=weight, selected_token_ids=targets.clamp_min(0),
            attention_mask=mask, advantages=advantages[:, 0], ref_per_token_logps=ref_logprobs,
            old_per_token_logps=old_logprobs,
        )
        return out[0] if isinstance(out, tuple) else out

    return P.Impl(fn, note="Liger GRPO loss (one advantage per sequence)")


def _logprobs_call(entropy: bool):
    def call(m, hidden, weight, targets):
        return m.linear_token_logprobs(hidden, weight, targets, ignore_index=IGNORE, return_entropy=entropy)

    return call


def _ppo_call(entropy_coef: float):
    def call(m, hidden, weight, targets, old_logprobs, ref_logprobs, advantages, mask):
        loss, stats = m.linear_ppo_loss(
            hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
            ignore_index=IGNORE, clip_low=0.2, clip_high=0.28, kl_coef=0.05, entropy_coef=entropy_coef,
        )
        return {"loss": loss, **stats}

    return call


def cases(preset: Preset) -> list[Case]:
    out = []
    for entropy in (False, True):
        op = "linear_token_logprobs+entropy" if entropy else "linear_token_logprobs"
        call = _logprobs_call(entropy)

        for params, dtype, headline in _shapes(preset):
            N, H, V = params["N"], params["H"], params["V"]
            if entropy and not headline and (preset.name != "cpu" or params["N"] != 128):
                continue  # the entropy variant: headline (and the V sweep on CPU)
            impls = standard_impls("linear_token_logprobs", call, "hidden", preset, headline=headline,
                                   compile_key=op)
            if not entropy:
                impls["liger"] = _liger_flce
                impls["cce"] = _cce
            out.append(Case(op=op, family="linear", params=dict(params), dtype=dtype,
                            make=_maker(N, H, V, dtype), impls=impls, flops=_flops(N, H, V),
                            headline=headline))

    frozen_op = "linear_token_logprobs:frozen_head"

    for params, dtype, headline in _frozen_shapes(preset):
        N, H, V = params["N"], params["H"], params["V"]
        impls = standard_impls("linear_token_logprobs", _logprobs_call(False), "hidden", preset,
                               headline=headline, compile_key=frozen_op, compile_always=True)
        impls["liger"] = _liger_flce
        impls["cce"] = _cce
        out.append(Case(op=frozen_op, family="linear", params=dict(params), dtype=dtype,
                        make=_maker(N, H, V, dtype, frozen=True), impls=impls, flops=_flops(N, H, V, frozen=True),
                        modes=("full",), headline=headline))

    for params, dtype, headline in _frozen_shapes(preset)[:1]:
        N, H, V = params["N"], params["H"], params["V"]
        op = "linear_ppo_loss:frozen_head"
        impls = standard_impls("linear_ppo_loss", _ppo_call(0.0), "hidden", preset, headline=headline,
                               compile_key=op, compile_always=True)
        out.append(Case(op=op, family="linear", params=dict(params), dtype=dtype,
                        make=_maker(N, H, V, dtype, ppo=True, frozen=True), impls=impls,
                        flops=_flops(N, H, V, frozen=True), modes=("full",), headline=headline))

    for params, dtype, headline in _shapes(preset):
        N, H, V = params["N"], params["H"], params["V"]
        if not headline and (preset.quick or params["N"] != (8192 if preset.name == "gpu" else 128)
                             or params["H"] != (4096 if preset.name == "gpu" else 256)
                             or params["V"] not in (8192, 32000, 65536, 262144)):
            continue  # linear_ppo_loss: headline and a V sweep
        impls = standard_impls("linear_ppo_loss", _ppo_call(0.01), "hidden", preset, headline=headline)
        impls["liger"] = _liger_grpo
        out.append(Case(op="linear_ppo_loss", family="linear", params=dict(params), dtype=dtype,
                        make=_maker(N, H, V, dtype, ppo=True), impls=impls, flops=_flops(N, H, V),
                        headline=headline))
    return out

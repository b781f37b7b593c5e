"""Per-token PPO pieces on ``[B, T]``: clipped_surrogate, kl_penalty, value_loss.

Work model: bandwidth — each input read once and each output written once (forward); the
gradient of the outputs and the inputs read, the input gradients written (backward).
"""

from __future__ import annotations

import torch

from . import Case, Preset, randn, standard_impls


def _shapes(preset: Preset):
    """(B, T) points, headline first; the sweep is over T (tokens per row)."""
    if preset.quick:
        return [((4, 256), True)]
    if preset.name == "cpu":
        return [((64, 1024), True), ((64, 256), False), ((64, 4096), False)]
    return [((1024, 8192), True), ((1024, 1024), False), ((1024, 32768), False)]


def _mask(B, T, device, gen):
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=gen, device=device)
    return (torch.arange(T, device=device)[None, :] < lengths).to(torch.float32)


def _surrogate_inputs(B, T):
    def make(device, gen):
        old = -randn((B, T), device, gen).abs() - 1.0
        return {
            "logprobs": (old + 0.1 * randn((B, T), device, gen)).requires_grad_(True),
            "old_logprobs": old,
            "advantages": randn((B, T), device, gen),
            "mask": _mask(B, T, device, gen),
        }

    return make


def _kl_inputs(B, T):
    def make(device, gen):
        lp = -randn((B, T), device, gen).abs() - 1.0
        return {"logprobs": lp.requires_grad_(True), "ref_logprobs": lp.detach() + 0.1 * randn((B, T), device, gen)}

    return make


def _value_inputs(B, T):
    def make(device, gen):
        old = randn((B, T), device, gen)
        return {
            "values": (old + 0.1 * randn((B, T), device, gen)).requires_grad_(True),
            "old_values": old,
            "returns": old + randn((B, T), device, gen),
            "mask": _mask(B, T, device, gen),
        }

    return make


def _surrogate(m, logprobs, old_logprobs, advantages, mask):
    loss, stats = m.clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.28,
                                      dual_clip=3.0, aggregation="token-mean")
    return {"loss": loss, **stats}


def _kl(m, logprobs, ref_logprobs):
    return m.kl_penalty(logprobs, ref_logprobs, "k3")


def _value(m, values, old_values, returns, mask):
    loss, stats = m.value_loss(values, old_values, returns, mask, clip=0.2, aggregation="token-mean")
    return {"loss": loss, **stats}


def cases(preset: Preset) -> list[Case]:
    out = []
    for op, call, maker, probe in (
        ("clipped_surrogate", _surrogate, _surrogate_inputs, "logprobs"),
        ("kl_penalty", _kl, _kl_inputs, "logprobs"),
        ("value_loss", _value, _value_inputs, "values"),
    ):
        for (B, T), headline in _shapes(preset):
            out.append(Case(op=op, family="ppo", params={"B": B, "T": T}, dtype=torch.float32,
                            make=maker(B, T), impls=standard_impls(op, call, probe, preset, headline=headline),
                            headline=headline))
    return out

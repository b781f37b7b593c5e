"""GAE on ``[B, T]`` float32 (forward only: no gradient flows through advantages).

Work model: bandwidth — rewards, values, mask read and advantages, returns written once.
Providers: reference (a reverse loop over T vectorized over rows), native, triton, and
``verl_loop``: the masked GAE loop that verl runs today, written here (not imported) — a reverse
loop over T that carries the running value and advantage across masked positions by blending with
the mask, a dozen small kernels per step. torch.compile of the reference is run only for T ≤ 256
because it unrolls the Python loop over T into the graph.
"""

from __future__ import annotations


import torch

from .. import providers as P
from . import Case, Preset, randn, standard_impls

GAMMA, LAM = 0.99, 0.95


def _shapes(preset: Preset):
    if preset.quick:
        return [((8, 64), True), ((8, 128), False)]
    if preset.name == "cpu":
        return [((256, 1024), True), ((256, 256), False), ((256, 4096), False), ((64, 1024), False),
                ((1024, 1024), False)]
    return [((1024, 8192), True), ((1024, 1024), False), ((1024, 32768), False), ((256, 8192), False),
            ((4096, 8192), False), ((64, 256), False)]


def _maker(B, T):
    def make(device, gen):
        lengths = torch.randint(T // 2, T + 1, (B, 1), generator=gen, device=device)
        pos = torch.arange(T, device=device)[None, :]
        mask = pos < lengths
        # a masked span inside every 4th row (tool output in a multi-turn rollout)
        span = torch.zeros_like(mask)
        span[::4, T // 4: T // 4 + max(1, T // 16)] = True
        mask = (mask & ~span).to(torch.float32)
        return {
            "rewards": randn((B, T), device, gen) * 0.1,
            "values": randn((B, T), device, gen),
            "mask": mask,
            "last_values": randn((B,), device, gen),
        }

    return make


def _call(m, rewards, values, mask, last_values):
    return m.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, last_values=last_values)


@torch.no_grad()
def verl_style_gae(rewards, values, mask, last_values, gamma=GAMMA, lam=LAM):
    """The loop over T that verl uses (masked variant), vectorized over rows.

    Masked positions keep the carried next-value and advantage, which gives the same result as
    dropping them; they are zeroed at the end as in signalrl.reference.gae.
    """
    T = rewards.shape[1]
    next_value = last_values
    carry = torch.zeros_like(last_values)
    steps = []
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * carry
        next_value = values[:, t] * m + (1.0 - m) * next_value
        carry = adv_t * m + (1.0 - m) * carry
        steps.append(carry)
    adv = torch.stack(steps[::-1], dim=1) * mask
    return adv, (adv + values) * mask


def _verl(device, x):
    return P.Impl(lambda rewards, values, mask, last_values: verl_style_gae(rewards, values, mask, last_values),
                  note="verl-style loop over T, written in signalrl/bench/cases/gae.py")


def cases(preset: Preset) -> list[Case]:
    out = []
    for (B, T), headline in _shapes(preset):
        def compile_ok():
            return "torch.compile unrolls the reference's Python loop over T into the graph (minutes of compile time)"

        impls = standard_impls("gae", _call, "rewards", preset, headline=headline, compile_ok=compile_ok)
        impls["verl_loop"] = _verl
        out.append(Case(op="gae", family="gae", params={"B": B, "T": T}, dtype=torch.float32, make=_maker(B, T),
                        impls=impls, modes=("fwd",), headline=headline))
    return out

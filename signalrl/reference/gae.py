"""Generalized advantage estimation with exact mask semantics.

For one row with valid positions t_1 < … < t_K (mask = 1), GAE runs on the compacted sequence:

    δ_k = r_k + γ·V_{k+1} − V_k,      V_{K+1} = last_value (0 if not given)
    A_k = δ_k + γλ·A_{k+1},           A_{K+1} = 0
    R_k = A_k + V_k

and scatters back; masked positions get A = R = 0. This equals right padding, left padding and
masked spans inside a sequence (e.g. tool output in a multi-turn rollout) without special cases.
No gradient flows through the result (values are treated as constants, as in every PPO code base).
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
    last_values: torch.Tensor | None = None,
):
    """rewards, values, mask ``[B, T]``; last_values ``[B]`` → (advantages, returns) ``[B, T]``.

    A reverse loop over T, vectorized over rows (the algorithm verl and TRL run today).
    float32 math (float64 for float64 input).
    """
    dt = acc_dtype(rewards, values)
    r = rewards.to(dt)
    v = values.to(dt)
    B, T = r.shape
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    next_value = r.new_zeros(B) if last_values is None else last_values.to(dt).clone()
    next_adv = r.new_zeros(B)
    adv = torch.zeros_like(r)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        valid = m[:, t]
        adv[:, t] = torch.where(valid, a, torch.zeros_like(a))
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, a, next_adv)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns

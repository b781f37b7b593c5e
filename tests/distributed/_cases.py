"""The inputs and error measures the distributed tests share (imported by the torchrun workers and by pytest)."""
from __future__ import annotations

import math

import torch

ALL_LOSSES = ["causal_lm", "enhanced_ppo", "conservative_ppo", "grpo", "dpo", "reward_modeling", "importance_sampling"]


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g).tolist()


def batches(loss: str, which: int) -> list[dict]:
    """Global batches with different lengths per example (so ranks get different token counts)."""
    s = 1000 * which + 17 * ALL_LOSSES.index(loss)
    lens = [(2 + (i * 3 + which) % 5, 1 + (i * 5 + which) % 7) for i in range(5)]  # (prompt, response) lengths
    if loss == "causal_lm":
        return [{"prompt": toks(s + i, p), "response": toks(s + 50 + i, r)} for i, (p, r) in enumerate(lens)]
    if loss in ("enhanced_ppo", "conservative_ppo"):
        return [{"prompt": toks(s + i, p), "response": toks(s + 50 + i, r),
                 "old_log_probs": [-5.5 + 0.1 * ((i + j) % 3) for j in range(r)], "rewards": float((i % 3) - 1)}
                for i, (p, r) in enumerate(lens)]
    if loss == "grpo":
        return [{"prompt": toks(s + i, p), "responses": [toks(s + 50 + i + 7 * j, 1 + (r + j) % 5) for j in range(3)],
                 "rewards": [float(i % 2), 1.0, 0.5 * i]} for i, (p, r) in enumerate(lens[:3])]
    if loss in ("dpo", "reward_modeling"):
        return [{"prompt": toks(s + i, p), "chosen": toks(s + 50 + i, r), "rejected": toks(s + 80 + i, 1 + (r + 2) % 6)}
                for i, (p, r) in enumerate(lens)]
    if loss == "importance_sampling":
        return [{"prompt": toks(s + i, p), "response": toks(s + 50 + i, r), "behavior_log_probs": -5.0 * r,
                 "rewards": float(i % 2)} for i, (p, r) in enumerate(lens)]
    raise ValueError(loss)


KWARGS = {"conservative_ppo": None, "dpo": None, "grpo": {"beta": 0.01}}


def rel(a: float, b: float) -> float:
    """|a − b| / max(|b|, 1): relative for values ≥ 1, absolute below (a GRPO loss ≈ 1e-8, a policy loss of
    5e-3, are sums of O(1) terms that cancel: their rounding is that of the terms)."""
    return abs(a - b) / max(abs(b), 1.0)


def dict_rel(a: dict, b: dict) -> float:
    """max |a − b| over every tensor, over the largest |b| of all of them (the model's scale: a tensor of tiny
    values is compared on that scale, not its own)."""
    if set(a) != set(b):
        return math.inf
    scale = max(float(t.double().abs().max()) for t in b.values())
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in b) / max(scale, 1e-30)


def norm_rel(a: dict, b: dict) -> float:
    """‖a − b‖₂ / ‖b‖₂ over all tensors together (the normwise relative error of the whole state)."""
    if set(a) != set(b):
        return math.inf
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b)
    den = sum(float((b[n].double() ** 2).sum()) for n in b)
    return math.sqrt(num / max(den, 1e-300))

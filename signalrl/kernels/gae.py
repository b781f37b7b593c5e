"""Triton GAE: a reverse parallel scan along T with a carry between T-blocks. Family ``gae``.

Kernel function (docs/backends.md)::

    gae_fwd(rewards[B,T], values[B,T], mask[B,T] f32 (0/1), last_values[B] f32,
            gamma: float, lam: float) -> (advantages[B,T] f32, returns[B,T] f32)

Inputs may be float32, bfloat16 or float16 (read as float32); ``mask`` may also be uint8 (0/1; the op passes
a bool mask as a uint8 view, so the kernel reads 1 byte per mask element); contiguous rows. Semantics are those
of :func:`signalrl.reference.gae`: per row, drop the masked positions, run GAE on what remains with
V(after the last valid token) = last_values[b], scatter back with zeros at masked positions.

Math. Both recurrences are first-order linear, x_t = d_t + c_t·x_{t+1}, which compose
associatively on pairs (c, d): scanning in reverse with ``(c1, d1) ∘ (c2, d2) = (c1·c2, d2 + c2·d1)``
gives, at every t of a block, (C_t, D_t) with x_t = D_t + C_t·x_{end}, so the carry x_{end} from the
block to the right finishes the block in one multiply-add.

1. "value of the next valid position" X_t = V_{next valid > t} (last_values if none): with the
   mask and values shifted by one (m'_t = m_{t+1}, V'_t = V_{t+1}; m'_{T−1} = 1, V'_{T−1} = last),
   X_t = m'_t·V'_t + (1 − m'_t)·X_{t+1}, i.e. c = 1 − m', d = (m' ? V' : 0). The shifted loads hit cache.
2. δ_t = r_t + γ·X_t − V_t at valid t; A_t = δ_t + γλ·A_{t+1} at valid t, and A_t = A_{t+1} at
   masked t (c = 1, d = 0: masked positions pass the advantage through), so c = m ? γλ : 1,
   d = m ? δ : 0.
Outputs: advantages = m·A, returns = m·(A + V).

Launch: one program per ``BLOCK_R`` rows (grid axis 0, so B is limited only by 2³¹), looping over
the T-blocks of its rows from the end. int64 row offsets (B·T may exceed 2³¹). The tile
(BLOCK_R × BLOCK_T, warps, stages) is autotuned on a GPU per power-of-two bucket of (B, T), so a new
sequence length does not retune; under the interpreter a fixed tile of at most 4 × 32 is used, so CPU
tests cross T-blocks at small T. Memory: the two outputs only. No gradient: values are treated as
constants (as in every PPO code base).

The combine order is checked against a float64 loop (tests/ops/test_gae.py: the swapped order fails the
combine-order and carry tests, whose coefficients vary along T; with constant ones both orders agree).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, maybe_autotune, next_pow2


@triton.jit
def _affine_combine(c1, d1, c2, d2):
    # (c1, d1) is the later position in a reverse scan: x ↦ d2 + c2·(d1 + c1·x)
    return c1 * c2, d2 + c2 * d1


@triton.jit
def _gae_fwd_kernel(
    rew_ptr, val_ptr, mask_ptr, last_ptr, adv_ptr, ret_ptr,
    B, T, gamma, lam, B_KEY, T_KEY,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    base = rows[:, None] * T  # int64
    gl = gamma * lam
    carry_x = tl.load(last_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # X beyond the block
    carry_a = tl.zeros([BLOCK_R], tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    cols0 = tl.arange(0, BLOCK_T)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK_T
        cols = (start + cols0)[None, :]
        ok = row_ok[:, None] & (cols < T)
        m = tl.load(mask_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(val_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(rew_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        # shifted sequence for X; the position T−1 sees (valid, last_values); past T: identity
        ok_s = row_ok[:, None] & (cols + 1 < T)
        m_s = tl.load(mask_ptr + base + cols + 1, mask=ok_s, other=0.0).to(tl.float32)
        v_s = tl.load(val_ptr + base + cols + 1, mask=ok_s, other=0.0).to(tl.float32)
        at_end = cols == T - 1
        m_s = tl.where(at_end, 1.0, m_s)
        v_s = tl.where(at_end, carry_x[:, None], v_s)  # carry_x is last_values until the first block is done
        d_s = tl.where(m_s > 0, v_s, 0.0)  # not m_s·v_s: a NaN value at a masked position must not leak
        cx, dx = tl.associative_scan((1.0 - m_s, d_s), axis=1, combine_fn=_affine_combine, reverse=True)
        x = dx + cx * carry_x[:, None]
        valid = m > 0
        delta = r + gamma * x - v
        ca = tl.where(valid, gl, 1.0)
        da = tl.where(valid, delta, 0.0)
        cA, dA = tl.associative_scan((ca, da), axis=1, combine_fn=_affine_combine, reverse=True)
        a = dA + cA * carry_a[:, None]
        tl.store(adv_ptr + base + cols, tl.where(valid, a, 0.0), mask=ok)
        tl.store(ret_ptr + base + cols, tl.where(valid, a + v, 0.0), mask=ok)
        first = cols == start
        carry_a = tl.sum(tl.where(first, a, 0.0), axis=1)
        carry_x = tl.sum(tl.where(first, x, 0.0), axis=1)


def _config(B: int, T: int) -> tuple[int, int, int]:
    """Default (BLOCK_R, BLOCK_T, num_warps) where no autotuning runs: about 4K elements per tile."""
    block_t = min(next_pow2(T), 1024)
    block_r = max(1, min(4096 // block_t, next_pow2(B), 64))
    return block_r, block_t, 8 if block_r * block_t >= 4096 else 4


_CONFIGS = [
    triton.Config({"BLOCK_R": r, "BLOCK_T": t}, num_warps=w, num_stages=s)
    for r, t, w in [(1, 1024, 4), (1, 2048, 8), (2, 1024, 8), (4, 512, 4), (4, 1024, 8), (8, 256, 4),
                    (16, 128, 4), (32, 64, 4), (64, 32, 4), (128, 16, 4), (256, 16, 8)]
    for s in (1, 2)
]


def _prune(configs, named_args, **kwargs):
    """Tiles no longer than the rows (and not needlessly short for long rows), no taller than B."""
    t_cap = next_pow2(named_args["T"])
    b_cap = next_pow2(named_args["B"])
    t_min = min(t_cap, 256)
    kept = [c for c in configs if t_min <= c.kwargs["BLOCK_T"] <= max(t_cap, 16) and c.kwargs["BLOCK_R"] <= b_cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_T"])]


# Autotuned on a GPU (keys bucketed to powers of two so new lengths don't retune); identity in the interpreter.
_gae_fwd_tuned = maybe_autotune(_CONFIGS, key=["B_KEY", "T_KEY"], prune=_prune)(_gae_fwd_kernel)


def gae_fwd(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    last_values: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    _block_r: int | None = None,
    _block_t: int | None = None,
    _num_warps: int | None = None,
):
    """See the module docstring. ``_block_r``/``_block_t`` force one tile (tests, benchmarks)."""
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    args = (rewards, values, mask, last_values, adv, ret, B, T, float(gamma), float(lam), next_pow2(B), next_pow2(T))
    if INTERPRET or _block_r or _block_t:
        block_r, block_t, warps = _config(B, T)
        if INTERPRET:  # short tiles: CPU tests then cross T-blocks (the carry) at small T
            block_r, block_t = min(block_r, 4), min(block_t, 32)
        block_r, block_t = _block_r or block_r, _block_t or block_t
        _gae_fwd_kernel[(triton.cdiv(B, block_r),)](
            *args, BLOCK_R=block_r, BLOCK_T=block_t, num_warps=_num_warps or warps
        )
    else:
        _gae_fwd_tuned[lambda meta: (triton.cdiv(B, meta["BLOCK_R"]),)](*args)
    return adv, ret

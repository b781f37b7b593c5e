"""The logits tile of the ``linear_logprobs`` family, shared by its forward (:mod:`.linear_logprobs`) and backward
(:mod:`.linear_logprobs_bwd`) kernels: z = (x[rows] @ w[cols].T + b[cols]) / T for one [BLOCK_N, BLOCK_V] block,
and the grouped program order that lets the row blocks needing one vocab tile read it from L2.
"""
from __future__ import annotations

import triton
import triton.language as tl

_NEG_BIG = tl.constexpr(-1.0e38)
_GROUP_N = 8  # row blocks sharing a vocab tile in turn

@triton.jit
def _tile_logits(
    x_ptr, w_ptr, b_ptr, rows, cols, N, V, H, k_iters, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z = (x[rows] @ w[cols].T + b[cols]) * inv_temp as a float32 [BLOCK_N, BLOCK_V] tile; -inf at cols >= V.
    ``k_iters`` = cdiv(H, BLOCK_K), or 0 to skip the product (a row block with nothing to compute)."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * H + ks[None, :]
    w_ptrs = w_ptr + cols[None, :] * H + ks[:, None]
    row_ok = rows[:, None] < N
    col_ok = cols[None, :] < V
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, k_iters):
        k_ok = (k * BLOCK_K + ks) < H
        xt = tl.load(x_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=col_ok & k_ok[:, None], other=0.0)
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        acc += b[None, :]
    z = acc * inv_temp
    return tl.where(col_ok, z, float("-inf"))


@triton.jit
def _grouped_pid(pid, n_row_blocks, n_col, GROUP_N: tl.constexpr):
    """Program id -> (row block, column index) with GROUP_N row blocks sharing each column index in turn."""
    per_group = GROUP_N * n_col
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_row_blocks - first, GROUP_N)
    local = pid % per_group
    return first + local % size, local // size


# the autotune key of the tile kernels (forward and backward)
_TILE_KEY = ["V", "H", "n_bucket", "HAS_BIAS", "WITH_ENTROPY", "DOT_F32"]

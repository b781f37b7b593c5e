"""How :mod:`signalrl.kernels.linear_logprobs` launches its kernels (no ``@triton.jit`` code here): the autotune
configs and their shared-memory prunes, the fixed configs of small problems and of the interpreter, the vocab split
of the forward and the one-time probe for cuBLAS with a float32 accumulator. (The backward's chunk plan,
``backward_plan``, stays beside the backward it plans.)
"""
from __future__ import annotations

import functools

import torch
import triton

from ._common import INTERPRET, cdiv, next_pow2, prune_configs


# fixed configs under the interpreter: small enough to exercise several row blocks, vocab tiles and H steps on tiny
# test shapes; the interpreter's cost is per block operation, so not too small either.
_INTERP_TILE = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_K=32)
_INTERP_MM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
# on a GPU, problems below this many multiply-adds run one fixed config instead of autotuning (tuning costs ~0.1 s
# per config and new shape, more than such a problem takes)
_TUNE_MIN_WORK = 1 << 34
_SMALL_TILE = (dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64), dict(num_warps=4, num_stages=3))
_SMALL_MM = (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), dict(num_warps=4, num_stages=3))


def _launch(raw, tuned, grid, args, flags, work, fixed):
    """Run ``raw`` with a fixed config (interpreter, small problems) or the autotuned ``tuned``;
    ``grid(meta)`` gives the launch grid. Returns the meta-parameters used."""
    if INTERPRET or work < _TUNE_MIN_WORK:
        meta, opts = fixed
        raw[grid(meta)](*args, **flags, **meta, **({} if INTERPRET else opts))
        return meta
    used = {}

    def g(meta):
        used.update(meta)  # the autotuner calls this last for the config it keeps
        return grid(meta)

    tuned[g](*args, **flags)
    return used


def _dot_smem(kw: dict, stages: int, elem: int = 2) -> int:
    """Shared memory of a logits tile loop: ``stages`` buffers of the x [BLOCK_N, BLOCK_K] and w [BLOCK_V, BLOCK_K]
    tiles (tests/kernels/test_offline_compile.py checks it bounds what ptxas allocates)."""
    return stages * (kw["BLOCK_N"] + kw["BLOCK_V"]) * kw["BLOCK_K"] * elem


def _mm_smem(kw: dict, stages: int, elem: int = 2) -> int:
    """Shared memory of the accumulating GEMM: ``stages`` buffers of its A and B tiles."""
    return stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elem


def _tile_configs():
    out = []
    for bn, bv, bk, st, w in [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (64, 256, 64, 4, 8), (64, 128, 64, 4, 4)]:
        out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk), num_stages=st, num_warps=w))
    return out


def _prune_tile(configs, named_args, **kwargs):
    n, h = named_args["N"], named_args["H"]
    elem = named_args["x_ptr"].element_size()
    return prune_configs(
        configs,
        limits={"BLOCK_N": max(next_pow2(n), 64), "BLOCK_K": max(next_pow2(h), 64)},
        smem_bytes=lambda kw, st: _dot_smem(kw, st, elem),
    )


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_plan(N: int, V: int, device) -> tuple[int, int]:
    """(v_per_split, n_split): enough programs (≈ 8 per SM with 128-row blocks) to fill the device."""
    if INTERPRET:
        v_per = max(256, cdiv(cdiv(V, 3), 256) * 256)  # a few splits, so the merge is exercised
        return v_per, cdiv(V, v_per)
    n_rb = cdiv(N, 128)
    want = max(1, cdiv(8 * _num_sms(device), n_rb))
    v_per = cdiv(cdiv(V, min(want, cdiv(V, 256))), 256) * 256
    return v_per, cdiv(V, v_per)


def _mm_configs():
    out = []
    for bm, bn, bk, st, w in [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (64, 128, 64, 4, 4)]:
        out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_stages=st, num_warps=w))
    return out


def _prune_mm(configs, named_args, **kwargs):
    elem = named_args["a_ptr"].element_size()
    return prune_configs(
        configs,
        limits={"BLOCK_M": max(next_pow2(named_args["M"]), 64)},
        smem_bytes=lambda kw, st: _mm_smem(kw, st, elem),
    )


@functools.lru_cache(maxsize=None)
def _cublas_f32_accumulate_ok(device_index: int) -> bool:
    try:
        dev = torch.device("cuda", device_index)
        a = torch.randn(96, 80, device=dev).to(torch.bfloat16)
        b = torch.randn(80, 48, device=dev).to(torch.bfloat16)
        c = torch.randn(96, 48, device=dev)
        expect = c + a[:, :72].float() @ b[:72].float()
        torch.addmm(c, a[:, :72], b[:72], out_dtype=torch.float32, out=c)
        ok = bool(((c - expect).norm() / expect.norm()).item() < 1e-4)
        # it must accumulate in place: no temporary of c's size (that would break the documented memory bound)
        count = torch.cuda.memory_stats(dev).get("allocation.all.allocated", 0)
        torch.addmm(c, a[:, :72], b[:72], out_dtype=torch.float32, out=c)
        return ok and torch.cuda.memory_stats(dev).get("allocation.all.allocated", 0) == count
    except Exception:  # noqa: BLE001 - an older torch without out_dtype, or a backend without it
        return False

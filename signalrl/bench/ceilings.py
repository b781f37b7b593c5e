"""This device's own ceilings, measured in the same run as the cases.

* ``copy_gbps``: a large same-device copy ``dst.copy_(src)``; bytes moved = read + write = 2 x size.
  CUDA: 1 GiB buffers. CPU: 256 MiB buffers (a ``memcpy`` of ATen; larger than any cache the
  preset's rotation is meant to defeat).
* ``matmul_tflops_<dtype>``: a large square matmul, 2·n³ flops per call. CUDA: n = 8192 in bf16 and
  fp32 (fp32 matmul on CUDA follows ``torch.backends.cuda.matmul.allow_tf32``, default off).
  CPU: n = 2048 in fp32 and bf16.

Each ceiling is timed with the same timer as the cases, and is the rate of its faster samples (the p20 time): a
ceiling is what the device can reach, and on a shared machine the median drifts with the neighbours' load.
"""

from __future__ import annotations

import torch

from .timing import time_step


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def measure(device: torch.device, *, quick: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)
    if quick:
        nbytes = 32 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_step(lambda: dst.copy_(src), device, quick=quick)
    out["copy_gbps"] = 2 * nbytes / (t.p20_ms * 1e-3) / 1e9
    out["copy_bytes"] = float(nbytes)
    del src, dst

    n = 8192 if cuda else 2048
    if quick:
        n = 512
    for dt in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        t = time_step(lambda: torch.mm(a, b), device, quick=quick)
        out[f"matmul_tflops_{_dtype_name(dt)}"] = 2 * n**3 / (t.p20_ms * 1e-3) / 1e12
        del a, b
    out["matmul_n"] = float(n)
    return out


def pct_of_ceiling(ceilings: dict[str, float], *, gbps: float | None, tflops: float | None,
                   dtype: str) -> tuple[float | None, str]:
    """Percent of the relevant ceiling: compute for cases with a flop model, else bandwidth."""
    if tflops is not None:
        key = f"matmul_tflops_{dtype}" if f"matmul_tflops_{dtype}" in ceilings else "matmul_tflops_fp32"
        ceil = ceilings.get(key)
        if ceil:
            return 100.0 * tflops / ceil, key
    if gbps is not None:
        ceil = ceilings.get("copy_gbps")
        if ceil:
            return 100.0 * gbps / ceil, "copy_gbps"
    return None, ""

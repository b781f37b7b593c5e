"""The small harness of the GPU kernel benchmarks (``gpu_logprobs.py``, ``gpu_ppo_gae.py``), over the suite's timer.

Times and peak memory come from :mod:`signalrl.bench.timing` (the one implementation every Signal benchmark uses):
on CUDA one pair of CUDA events per call with the L2 cache flushed before it, the median over the calls; peak bytes
as ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before the call. The ceilings the rows are compared
with (copy bandwidth, bf16 matmul rate) are the suite's :func:`signalrl.bench.ceilings.measure`, in the same run.

A case is a function ``bench_<name>(ctx) -> list[dict]``; build each row with ``ctx.row(case, shape, time_ms,
**fields)``. ``--dry-run``: CPU, Triton interpreter, tiny shapes (``ctx.pick(big, small)`` picks ``small``), a single
timed call after one warm-up, no memory figures — a check that the cases run, timings meaningless.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Callable, Sequence

import torch

from signalrl.bench import ceilings, timing

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Ctx:
    """What a case sees: the device, the shape picker, the timer, the memory meter and the measured ceilings."""

    def __init__(self, dry_run: bool, quick: bool):
        self.dry_run = dry_run
        self.quick = quick
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.copy_gbps = float("nan")
        self.matmul_tflops = float("nan")

    def pick(self, big, small):
        return small if self.dry_run else big

    def time_ms(self, fn, warmup: int = 25, rep: int = 100) -> float:
        """Median milliseconds of ``fn()``: ``warmup`` / ``rep`` are the milliseconds spent warming up / measuring on
        CUDA (:func:`signalrl.bench.timing.time_cuda`); on CPU one timed call after one warm-up."""
        if self.cuda:
            return timing.time_cuda(fn, self.device, warmup_s=warmup / 1e3, rep_s=rep / 1e3).median_ms
        return timing.time_step(fn, self.device, smoke=True).median_ms

    def peak_extra(self, fn, keep_bytes: int = 0):
        """Peak bytes allocated while ``fn()`` runs beyond what existed before and ``keep_bytes`` of results it
        must produce (e.g. the gradients). None off CUDA (``fn`` still runs once)."""
        if not self.cuda:
            fn()
            return None
        return timing.peak_memory(fn, self.device) - keep_bytes

    @staticmethod
    def row(case: str, shape: str, time_ms: float | None, **fields) -> dict:
        r = {"case": case, "shape": shape, "time_ms": time_ms}
        r.update(fields)
        return r

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def measure_ceilings(ctx: Ctx) -> None:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) of this device, into ``ctx``."""
    c = ceilings.measure(ctx.device, quick=ctx.dry_run)
    ctx.copy_gbps = c["copy_gbps"]
    ctx.matmul_tflops = c["matmul_tflops_bf16"]
    ctx.free()


def environment(ctx: Ctx) -> dict:
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": ctx.dry_run,
        "copy_GBps": ctx.copy_gbps,
        "bf16_matmul_TFLOPs": ctx.matmul_tflops,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        env.update(device=p.name, sm_count=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    else:
        env["device"] = "cpu (dry run: Triton interpreter, tiny shapes; timings meaningless)"
    return env


def _fmt(v, spec="{:.1f}"):
    if v is None:
        return "—"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def table(rows: list[dict]) -> str:
    head = "| case | shape | ms | % matmul | % copy BW | extra MiB | extra % of [N,V] f32 | speedup (baseline/ours) | notes |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append("| " + " | ".join([
            r["case"], r.get("shape", ""), _fmt(r.get("time_ms"), "{:.3f}"), _fmt(r.get("pct_matmul")),
            _fmt(r.get("pct_copy")), _fmt(r.get("extra_mem_mb")), _fmt(r.get("extra_mem_pct_logits"), "{:.2f}"),
            _fmt(r.get("speedup"), "{:.2f}"), r.get("notes", "") or r.get("error", ""),
        ]) + " |")
    return "\n".join(lines)


def main(cases: Sequence[Callable], *, stem: str, title: str, description: str, argv=None) -> int:
    """Parse the common arguments, measure the ceilings, run ``cases`` (a case that raises becomes an error row; the
    others go on) and write ``<stem>-<device>-<UTC time>.json`` / ``.md`` to ``--out``. Exit status 1 on an error
    row."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--only", default=None, help="run the cases whose function name contains this")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for a CPU sanity check", file=sys.stderr)
        return 2
    ctx = Ctx(dry_run=args.dry_run, quick=args.quick)
    t_start = time.time()
    measure_ceilings(ctx)
    rows = []
    for fn in cases:
        if args.only and args.only not in fn.__name__:
            continue
        t0 = time.time()
        try:
            rows.extend(fn(ctx))
        except Exception as e:  # noqa: BLE001 - record and go on with the other cases
            traceback.print_exc()
            rows.append(ctx.row(fn.__name__, "", None, error=f"{type(e).__name__}: {e}"[:300]))
        print(f"[bench] {fn.__name__}: {time.time() - t0:.1f} s", file=sys.stderr)
        ctx.free()
    env = environment(ctx)
    env["wall_s"] = round(time.time() - t_start, 1)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "dryrun" if ctx.dry_run else env.get("device", "gpu").replace(" ", "_")
    name = f"{stem}-{tag}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
    (out / f"{name}.md").write_text(f"# {title} — {env['device']}\n\n"
                                    + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n" + table(rows) + "\n")
    print(f"\ndevice: {env['device']}  copy {ctx.copy_gbps:.0f} GB/s  bf16 matmul {ctx.matmul_tflops:.0f} TFLOP/s")
    print(table(rows))
    print(f"\nwritten: {out / name}.json, .md")
    return 1 if any("error" in r for r in rows) else 0

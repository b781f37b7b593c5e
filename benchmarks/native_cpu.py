"""Native CPU kernels (csrc/) vs the PyTorch code they replace, side by side in one run.

    python benchmarks/native_cpu.py            # full shapes (a few minutes on 2 cores)
    python benchmarks/native_cpu.py --quick    # small shapes, smoke test
    python benchmarks/native_cpu.py --threads 1 --clock cpu   # per-core, robust to a busy machine

Cases (issue 2, "Measured"):

1. GAE, B=256, T=1024 fp32: ``gae_fwd`` vs ``signalrl.reference.gae`` (the reverse loop over T,
   vectorized over rows, that verl and TRL run). Goal ≥ 50×.
2. token log-probs, N=4096, V=32000, fp32 and bf16: ``token_logprobs_fwd`` vs
   ``log_softmax(logits.float(), -1).gather(...)``. Goal ≥ 2.5× and no [N, V] fp32 temporary.
3. linear token log-probs, N=4096, V=32000, H=1024: peak memory of ``linear_token_logprobs_fwd``
   vs materialized logits (``reference.linear_token_logprobs``). Goal ≤ 10%.

Peak memory (measured first): resident-set high-water mark during one call minus the resident
set just before it (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``), with glibc told (mallopt) to serve every allocation >= 64 KiB with its
own mmap, so freed tensors leave the resident set at once and every new tensor shows up in it:
the figure is the peak of extra memory the call touched, including memory a kernel allocates
privately. Linux only.

Time (measured second): median wall time of repeated calls after warm-up (time.perf_counter),
inputs resident, with the allocator in the steady state glibc's dynamic thresholds reach in a
loop (blocks up to 32 MiB reused from the heap; larger ones fresh mmaps, page faults included).

Results are printed and written to benchmarks/results/native_cpu_<cpu>_<threads>t.md.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from signalrl import native  # noqa: E402
import signalrl.ops  # noqa: E402,F401  (defines the torch.ops.signalrl kernel ops)
from signalrl import reference as ref  # noqa: E402


# ---- measurement --------------------------------------------------------------------------------

def _mallopt(param: int, value: int) -> bool:
    try:
        return ctypes.CDLL("libc.so.6").mallopt(param, value) == 1
    except OSError:
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024


def peak_rss_delta(fn) -> int:
    """Extra resident bytes at the peak of one call of fn (see module docstring)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    out = fn()
    peak = _status("VmHWM")
    del out
    return max(peak - before, 0)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def median_time(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median, min) time of fn over reps calls after warmup calls, on the chosen clock."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = _clock()
        fn()
        ts.append(_clock() - t0)
    return statistics.median(ts), min(ts)


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.3f} ms" if s < 0.01 else f"{s * 1e3:,.1f} ms"


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor() or "unknown CPU"
    except OSError:
        return platform.processor() or "unknown CPU"


# ---- cases --------------------------------------------------------------------------------------
# Each case: the baseline and native callables on resident inputs; measure() runs them.

def gae_cases(B: int, T: int) -> list[dict]:
    torch.manual_seed(0)
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = torch.randint(T // 2, T + 1, (B,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # right padding
    mask[:, T // 4: T // 4 + 16] = 0  # and a masked span (tool output)
    last = torch.randn(B)
    gae = torch.ops.signalrl.gae_fwd

    def base():
        return ref.gae(rewards, values, mask, gamma=0.99, lam=0.95, last_values=last)[0]

    def nat():
        return gae(rewards, values, mask, last, 0.99, 0.95)[0]

    err = ((nat() - base()).abs().max() / base().abs().max()).item()
    threads = torch.get_num_threads()
    return [dict(case=f"GAE B={B} T={T} fp32, {n} thread{'s' if n > 1 else ''}", threads=n,
                 base_name="reference.gae (loop over T)", base=base, nat=nat, memory=False, native_reps=20,
                 goal="≥ 50×", note=f"max rel diff {err:.1e}") for n in sorted({1, threads})]


def token_cases(N: int, V: int) -> list[dict]:
    cases = []
    fwd, bwd = torch.ops.signalrl.token_logprobs_fwd, torch.ops.signalrl.token_logprobs_bwd
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        logits = (torch.randn(N, V) * 3).to(dtype)
        targets = torch.randint(0, V, (N,))

        def base(logits=logits, targets=targets):
            return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)

        def nat(logits=logits, targets=targets):
            return fwd(logits, targets, 1.0, -100, False)[0]

        err = (nat() - base()).abs().max().item()
        cases.append(dict(case=f"token_logprobs N={N} V={V} {str(dtype).split('.')[-1]}",
                          base_name="log_softmax(x.float()) + gather", base=base, nat=nat, memory=True,
                          goal="≥ 2.5×, no [N, V] fp32 temporary", note=f"max abs diff {err:.1e}"))

        # forward + backward (d logits in the input dtype): autograd through the same PyTorch code
        x = logits.detach().requires_grad_()
        g = torch.randn(N)

        def base_fb(x=x, targets=targets, g=g):
            x.grad = None
            torch.log_softmax(x.float(), -1).gather(-1, targets[:, None]).squeeze(-1).backward(g)
            return x.grad

        empty = torch.empty(0)  # no entropy term

        def nat_fb(logits=logits, targets=targets, g=g):
            lp, _, lse = fwd(logits, targets, 1.0, -100, False)
            return bwd(g, empty, logits, targets, lse, empty, 1.0, -100)

        cases.append(dict(case=f"token_logprobs fwd+bwd N={N} V={V} {str(dtype).split('.')[-1]}",
                          base_name="autograd of the same", base=base_fb, nat=nat_fb, memory=True,
                          goal="– (information)", note="both return d logits [N, V] in the input dtype"))
    return cases


def linear_cases(N: int, V: int, H: int) -> list[dict]:
    cases = []
    fwd = torch.ops.signalrl.linear_token_logprobs_fwd
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        hidden = torch.randn(N, H).to(dtype)
        weight = (torch.randn(V, H) / H**0.5).to(dtype)
        targets = torch.randint(0, V, (N,))

        def base(hidden=hidden, weight=weight, targets=targets):
            return ref.linear_token_logprobs(hidden, weight, targets)

        def nat(hidden=hidden, weight=weight, targets=targets):
            return fwd(hidden, weight, None, targets, 1.0, -100, False)[0]

        err = (nat() - base()).abs().max().item()
        cases.append(dict(case=f"linear_token_logprobs N={N} V={V} H={H} {str(dtype).split('.')[-1]}",
                          base_name="reference (materialized fp32 logits)", base=base, nat=nat, memory=True,
                          logits_bytes=N * V * 4, warmup=1, goal="peak ≤ 10% of materialized",
                          note=f"max abs diff {err:.1e}"))
    return cases


def measure(cases: list[dict], reps: int) -> list[dict]:
    """Memory first (main() has already set the 64 KiB mmap threshold), then time."""
    rows = [dict(c) for c in cases]
    for r in rows:
        if r["memory"]:
            r["m_base"], r["m_native"] = peak_rss_delta(r["base"]), peak_rss_delta(r["nat"])
            if "logits_bytes" in r:
                r["note"] += (f"; native peak = {100 * r['m_native'] / r['logits_bytes']:.1f}% of the [N, V] fp32 "
                              f"logits ({_mb(r['logits_bytes'])})")
            print(f"  memory {r['case']}", flush=True)
    # 2. time, with the allocator in the state glibc's dynamic thresholds reach in a loop: blocks up to
    # 32 MiB are reused from the heap, larger ones are fresh mmaps (page faults included)
    _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    threads = torch.get_num_threads()
    for r in rows:
        torch.set_num_threads(r.get("threads", threads))
        w = r.get("warmup", 2)
        r["t_base"] = median_time(r["base"], reps, warmup=w)
        r["t_native"] = median_time(r["nat"], reps * r.get("native_reps", 1), warmup=max(w, 5))
        torch.set_num_threads(threads)
        print(f"  timed {r['case']}", flush=True)
    return rows


# ---- report -------------------------------------------------------------------------------------

def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Native CPU kernels vs PyTorch",
        "",
        f"- device: {meta['cpu']} (torch threads: {meta['threads']}; logical CPUs: {os.cpu_count()})",
        f"- torch {meta['torch']}, Python {platform.python_version()}, {meta['date']}",
        f"- load average at start: {meta['load']} (the machine is shared: timings are noisy)",
        f"- command: `{meta['command']}`",
        f"- time: median (min) {'process CPU' if meta['clock'] == 'cpu' else 'wall'} time per call, inputs resident,"
        " after warm-up; speed-up of medians (of mins);"
        " memory: peak extra resident set during one call (VmHWM − VmRSS, glibc mmap threshold 64 KiB);"
        " see the docstring of benchmarks/native_cpu.py",
        "",
        "| case | baseline | baseline time | native time | speed-up | baseline peak | native peak | memory ratio | goal | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        mb, mn = r.get("m_base"), r.get("m_native")
        (tb, tb_min), (tn, tn_min) = r["t_base"], r["t_native"]
        lines.append(
            f"| {r['case']} | {r['base_name']} | {_ms(tb)} ({_ms(tb_min)}) | {_ms(tn)} ({_ms(tn_min)}) | "
            f"**{tb / tn:.1f}×** ({tb_min / tn_min:.1f}×) | {_mb(mb) if mb is not None else '–'} | "
            f"{_mb(mn) if mn is not None else '–'} | {f'{100 * mn / mb:.1f}%' if mb else '–'} | {r['goal']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default benchmarks/results/...)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: process CPU time, robust to other load on the machine "
                        "but only meaningful with --threads 1")
    args = p.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    # Before any tensor exists: every allocation >= 64 KiB gets its own mmap, so the resident set
    # follows live memory in the memory pass of measure().
    if not _mallopt(_M_MMAP_THRESHOLD, 64 * 1024):
        print("warning: mallopt unavailable; peak memory figures include allocator reuse effects")
    native.load()
    reps = args.reps or (3 if args.quick else 7)
    if args.quick:
        cases = gae_cases(64, 256) + token_cases(256, 8000) + linear_cases(256, 8000, 256)
    else:
        cases = gae_cases(256, 1024) + token_cases(4096, 32000) + linear_cases(4096, 32000, 1024)
    rows = measure(cases, reps)
    meta = dict(
        cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        clock=args.clock,
        command="python benchmarks/native_cpu.py" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --clock {args.clock}" if args.clock != "wall" else ""),
    )
    text = render(rows, meta)
    print(text)
    if args.out is None and args.quick:
        return 0
    slug = re.sub(r"[^a-z0-9]+", "-", meta["cpu"].lower()).strip("-")
    suffix = "_cpuclock" if args.clock == "cpu" else ""
    out = args.out or _REPO / "benchmarks" / "results" / f"native_cpu_{slug}_{meta['threads']}t{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``signal bench`` / ``python -m benchmarks`` (in a checkout) / ``python -m signalrl.bench``: run the kernel
benchmark suite.

Examples::

    python -m benchmarks --preset cpu                 # this machine, a few minutes
    python -m benchmarks --preset gpu --out $OUT/bench
    python -m benchmarks --quick --out /tmp/bench     # CI smoke (< 1 min)
    python -m benchmarks --ops gae,kl_penalty --providers reference,native
    python -m benchmarks --preset cpu --busy          # the same, with one core kept busy (signalrl/bench/busy.py)
    python -m benchmarks --render benchmarks/results/cpu   # redraw table and plots from rows.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time

PRESETS = ("quick", "cpu", "gpu")
DEFAULT_BUDGET_S = {"quick": 45.0, "cpu": 600.0, "gpu": 240.0}
DEFAULT_MAX_S = {"quick": None, "cpu": None, "gpu": 300.0}


def results_dir() -> str:
    """Default home of results: ``benchmarks/results`` of the source checkout this package is imported from;
    from an installed wheel (no checkout beside it), ``./bench-results`` under the current directory."""
    checkout = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "benchmarks", "results")
    return os.path.normpath(checkout) if os.path.isdir(checkout) else os.path.join(os.getcwd(), "bench-results")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signal bench",
        description="Signal kernel benchmarks: every op, every backend, peers and this device's ceilings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument("--preset", choices=PRESETS, help="shape set (default: gpu with CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (CI smoke, under a minute)")
    p.add_argument("--out", help="output directory (default: benchmarks/results/<device>/ in a checkout, "
                   "else ./bench-results/<device>/)")
    p.add_argument("--ops", help="comma-separated op names or families to run (default: all)")
    p.add_argument("--providers", help="comma-separated providers (default: all): "
                   "reference,compile,native,triton,liger,cce,verl_loop")
    p.add_argument("--modes", default="fwd,bwd,full", help="comma-separated modes (default: fwd,bwd,full)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda for the gpu preset, else cpu")
    p.add_argument("--budget-s", type=float, help="stop starting new measurements after this many seconds "
                   "(remaining rows say 'skipped: time budget'); default quick 45, cpu 600, gpu 240")
    p.add_argument("--max-s", type=float, help="hard stop: after this many seconds the run is interrupted as by "
                   "Ctrl-C (measured rows are kept, table and plots rendered); default gpu 300, else none")
    p.add_argument("--triton-interpret", action="store_true",
                   help="on CPU, run the triton provider in the Triton interpreter (smoke only; default in --quick)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 for --quick)")
    p.add_argument("--busy", action="store_true", help="keep one core busy with a bounded background process "
                   "during the run (signalrl/bench/busy.py); default --out gets a -busy suffix")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the cases of the preset and exit")
    p.add_argument("--render", metavar="DIR", help="only re-render results.md and plots from DIR/rows.jsonl")
    return p


def device_slug(device) -> str:
    if device.type != "cuda":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(device).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _progress(total: int, enabled: bool):
    """A callable advancing a progress bar by one unit (tqdm, else plain lines), and a closer."""
    if not enabled:
        return (lambda desc: None), (lambda: None)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="unit", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

        def step(desc):
            bar.set_postfix_str(desc[:60], refresh=False)
            bar.update(1)

        return step, bar.close
    except ImportError:
        count = [0]

        def step(desc):
            count[0] += 1
            print(f"[{count[0]}/{total}] {desc}", file=sys.stderr, flush=True)

        return step, (lambda: None)


def _order_cases(cases):
    """Headline shapes first (family order), then the sweeps round-robin over ops, so that a time
    budget cuts the tail of every sweep rather than whole ops."""
    head = [c for c in cases if c.headline]
    by_op: dict[str, list] = {}
    for c in cases:
        if not c.headline:
            by_op.setdefault(c.op, []).append(c)
    rest = []
    while any(by_op.values()):
        for op in list(by_op):
            if by_op[op]:
                rest.append(by_op[op].pop(0))
    return head + rest


def _select(items, wanted: str | None, key):
    if not wanted:
        return items
    names = {w.strip() for w in wanted.split(",") if w.strip()}
    return [it for it in items if any(n == k or n in k.split("+") for k in key(it) for n in names)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render:
        return _render(args.render, not args.no_plots)
    preset_name = "quick" if args.quick else args.preset

    import torch  # imported after argument parsing so --help is instant

    if preset_name is None:
        preset_name = "gpu" if torch.cuda.is_available() else "cpu"
    dev_type = args.device or ("cuda" if preset_name == "gpu" or (preset_name == "quick" and torch.cuda.is_available())
                               else "cpu")
    if dev_type == "cuda" and not torch.cuda.is_available() and args.list:
        dev_type = "cpu"  # listing a GPU preset's cases needs no GPU
    if dev_type == "cuda" and not torch.cuda.is_available():
        print("signal bench: --device cuda (or --preset gpu) needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    if dev_type == "cpu" and (args.triton_interpret or preset_name == "quick"):
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
    import warnings

    # the interpreter evaluates masked-off lanes too (log(0) etc.); those lanes are discarded
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif preset_name == "quick" and dev_type == "cpu":
        torch.set_num_threads(1)  # a smoke test: one thread avoids OpenMP stalls on a busy CI machine
    device = torch.device("cuda", torch.cuda.current_device()) if dev_type == "cuda" else torch.device("cpu")

    from . import ceilings as C
    from . import providers as P
    from . import report
    from .cases import FAMILIES, Preset, all_cases
    from .runner import Runner

    preset = Preset(name=preset_name, device=device, compile_all_shapes=False,
                    run_compile=(preset_name != "quick"))
    cases = all_cases(preset)
    cases = _select(cases, args.ops, lambda c: (c.op, c.family) + tuple(c.op.split("+")))
    cases = _order_cases(cases)
    providers = [p.strip() for p in (args.providers or ",".join(P.PROVIDERS)).split(",") if p.strip()]
    unknown = set(providers) - set(P.PROVIDERS)
    if unknown:
        print(f"signal bench: unknown provider(s) {sorted(unknown)}; known: {', '.join(P.PROVIDERS)}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.list:
        for c in cases:
            provs = [p for p in P.PROVIDERS if p in c.impls and p in providers]
            print(f"{c.op:32s} {c.shape:28s} {c.dtype_name:5s} {'headline' if c.headline else '':8s} "
                  f"modes={','.join(m for m in c.modes if m in modes)} providers={','.join(provs)}")
        return 0

    out_dir = args.out or os.path.join(results_dir(), device_slug(device) + ("-quick" if preset_name == "quick" else "")
                                       + ("-busy" if args.busy else ""))
    os.makedirs(out_dir, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[preset_name]
    versions = P.versions()
    t_start = time.time()
    writer = report.RowWriter(out_dir)
    meta = {
        "preset": preset_name, "device": None, "device_type": device.type, "versions": versions,
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget,
        "threads": torch.get_num_threads(), "interrupted": False,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "families": list(FAMILIES),
        "headline_keys": sorted({(c.op, c.shape, c.dtype_name) for c in cases if c.headline}),
        "memory_method": ("torch.cuda.max_memory_allocated above memory_allocated before the call" if device.type == "cuda"
                          else "torch.profiler memory events (c10 CPU allocator): peak of live tensor bytes above the start of the call"),
    }
    print(f"signal bench: preset {preset_name} on {device}, {len(cases)} cases, out {out_dir}", file=sys.stderr)
    close = lambda: None  # noqa: E731
    max_s = args.max_s if args.max_s is not None else DEFAULT_MAX_S[preset_name]
    old_handlers = _install_stop_handlers(max_s)
    background = contextlib.ExitStack()  # --busy: the background load, stopped in `finally`
    try:
        if args.busy:
            from . import busy

            busy_s = 2 * max(budget, max_s or 0.0) + 300
            background.enter_context(busy.busy_core(busy_s))
            meta["busy"] = busy.describe(busy_s)
        ceil = C.measure(device, quick=preset.quick)
        meta["ceilings"] = ceil
        print("ceilings: " + ", ".join(f"{k}={v:.3g}" for k, v in ceil.items()), file=sys.stderr)
        runner = Runner(preset, ceil, versions, providers=providers, modes=modes, budget_s=budget, emit=writer)
        meta["device"] = runner.dev_name
        total = sum(len(runner.units(c)) for c in cases)
        runner.progress, close = _progress(total, not args.no_progress)
        for case in cases:
            runner.run_case(case)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        print("\nsignal bench: interrupted — keeping what was measured", file=sys.stderr)
    finally:
        background.close()
        _restore_stop_handlers(old_handlers)
        close()
        writer.close()
        meta["duration_s"] = time.time() - t_start
        if meta["device"] is None:
            from .runner import device_name

            meta["device"] = device_name(device)
        meta = report.finalize(out_dir, writer.rows, meta, with_plots=not args.no_plots)
        ok = sum(1 for r in writer.rows if r.get("status") == "ok")
        print(f"signal bench: {len(writer.rows)} rows ({ok} measured) in {meta['duration_s']:.0f} s -> "
              f"{os.path.join(out_dir, 'results.md')}", file=sys.stderr)
    return 130 if meta.get("interrupted") else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _install_stop_handlers(max_s: float | None):
    """SIGTERM, and SIGALRM after ``max_s`` seconds, stop the run like Ctrl-C (rows are kept)."""
    import signal

    if not hasattr(signal, "SIGALRM"):
        return None
    try:
        old = (signal.signal(signal.SIGTERM, _interrupt), signal.signal(signal.SIGALRM, _interrupt))
    except ValueError:  # not the main thread: no handlers, no hard stop
        return None
    if max_s:
        signal.setitimer(signal.ITIMER_REAL, max_s)
    return old


def _restore_stop_handlers(old) -> None:
    import signal

    if old is None:
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGTERM, old[0])
    signal.signal(signal.SIGALRM, old[1])


def _render(out_dir: str, with_plots: bool) -> int:
    from . import report

    rows = report.load_rows(os.path.join(out_dir, "rows.jsonl"))
    meta_path = os.path.join(out_dir, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    report.finalize(out_dir, rows, meta, with_plots=with_plots)
    print(f"rendered {len(rows)} rows -> {os.path.join(out_dir, 'results.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The whole ``signal demo``, local against remote: what a user of the remote API waits for end to end.

    python -m benchmarks.remote_demo [--repeats 4] [--warmup 1] [--algo ppo] [--engine process thread] [--quick]
        [--out FILE]

One ``signal serve`` subprocess on 127.0.0.1 per ``--engine`` (the same start as
:mod:`benchmarks.remote_overhead`), then ``signal demo`` run ``--repeats`` times locally and ``--repeats`` times
with ``--remote`` on each server, the sides taking turns (each first in turn) so that slow drifts of a shared
machine hit all alike, after ``--warmup`` uncounted demos of each (a server is long-lived: its first requests import and build what later ones reuse). Each demo is a
fresh process. The figure is the demo's own ``elapsed_s`` (its ``summary.json``): from the creation of its client
to its close, so SFT, reward model, sampling, PPO and the evaluations. The runs must print the same table: every
``summary.json`` must hold the same rewards and task scores, locally and remotely.

:mod:`benchmarks.remote_overhead` measures a single training step, where the protocol's fixed cost per request
is largest. This measures the demo as a whole: the client's own work (reward functions, the evaluation's
bookkeeping) runs in its process while the server computes.

Writes ``benchmarks/results/remote_demo_cpu.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import save_study
from .remote_overhead import _start_server

SAME = ("reward_before", "reward_after", "task_score_before", "task_score_after")


def _demo(out: str, algo: str, threads: int, remote: tuple[str, str] | None, quick: bool = False) -> dict:
    cmd = [sys.executable, "-m", "signalrl.cli", "demo", "--algo", algo, "--out", out, "--quiet"]
    if quick:
        cmd.append("--quick")
    if remote is not None:
        cmd += ["--remote", remote[0], "--api-key", remote[1]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--algo", default="ppo", choices=("ppo", "grpo", "dpo"))
    p.add_argument("--threads", type=int, default=2, help="torch threads of each process (OMP_NUM_THREADS)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted demos of each side first (the server is "
                   "long-lived: its first requests import and build what later ones reuse)")
    p.add_argument("--engine", nargs="+", choices=["process", "thread"], default=["process", "thread"],
                   help="the servers' engines (`signal serve --engine ...`), each a remote side")
    p.add_argument("--quick", action="store_true", help="the demo's --quick settings (smoke test)")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/remote_demo_cpu.md)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats: expected at least 1; --warmup: at least 0")

    from signalrl.server import auth
    from signalrl.server.store import Store

    root = tempfile.mkdtemp(prefix="signal-remote-demo-")
    server: dict[str, tuple[str, str] | None] = {"local": None}
    procs = []
    sides = ["local", *(f"remote ({e})" for e in args.engine)]
    times: dict[str, list[float]] = {side: [] for side in sides}
    summaries = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        for engine in args.engine:  # one server per engine, each on its own root
            sub = os.path.join(root, engine)
            os.makedirs(sub)
            _, k = auth.create_key(Store(os.path.join(sub, "signal.db")), "bench")
            proc, url = _start_server(sub, argparse.Namespace(threads=args.threads), engine)
            procs.append(proc)
            server[f"remote ({engine})"] = (url, k)
        for side in sides[::-1]:  # uncounted: a server's first run imports and builds
            for _ in range(args.warmup):
                _demo(tempfile.mkdtemp(prefix="warmup-", dir=root), args.algo, args.threads, server[side], args.quick)
        for i in range(args.repeats):
            order = sides[i % len(sides):] + sides[:i % len(sides)]  # each side first in turn
            for side in order:
                out = tempfile.mkdtemp(prefix="demo-", dir=root)
                s = _demo(out, args.algo, args.threads, server[side], args.quick)
                times[side].append(s["elapsed_s"])
                summaries.append(s)
                print(f"{side} {i + 1}: {s['elapsed_s']:.2f} s", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    tables = {tuple(s[k] for k in SAME) for s in summaries}
    if len(tables) != 1:
        raise SystemExit(f"the demos printed different tables: {sorted(tables)}")
    med = {k: statistics.median(v) for k, v in times.items()}
    first = summaries[0]
    lines = [
        "# The whole demo, local and remote (cpu, loopback)",
        "",
        f"Command: `python -m benchmarks.remote_demo --repeats {args.repeats} --algo {args.algo} --threads "
        f"{args.threads} --warmup {args.warmup} --engine {' '.join(args.engine)}{' --quick' if args.quick else ''}`  ",
        f"Date: {started}; {platform.machine()}, {os.cpu_count()} cores (shared); torch {torch.__version__}, Python "
        f"{platform.python_version()}. Servers: `signal serve` in a subprocess on 127.0.0.1 with its defaults, one per "
        "`--engine`. Each demo is a fresh `signal demo` process; the sides take turns (each first in turn), after "
        "uncounted warm-up demos of each.",
        "",
        "| demo | runs | median s | each run, s |",
        "|---|---:|---:|---|",
        *(f"| {side} | {len(v)} | {med[side]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |"
          for side, v in times.items()),
        "",
        "**Remote / local** (ratio of the medians): " + ", ".join(
            f"{side} **{med[side] / med['local']:.2f}×**" for side in sides[1:]) + ". Every run printed the same "
        f"table: reward before {first['reward_before']:+.3f}, after {first['reward_after']:+.3f}; task score "
        f"{first['task_score_before']:.3f} → {first['task_score_after']:.3f}.",
        "",
        "The time is the demo's own `elapsed_s`, from the creation of its client to its close (every stage and "
        "evaluation). Remotely the client's Python (reward functions, the evaluation) runs in its own process while "
        "the server computes, which offsets the protocol's cost per request. For that cost on one step, see "
        "`remote_overhead_cpu.md`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save_study(text, args.out, "remote_demo_cpu.md", args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Overhead of the remote client: the same training steps through ``signal serve`` on loopback versus the local
engine in this process, and the speed-up from pipelining with futures across the network.

    python -m benchmarks.remote_overhead [--steps 30] [--repeats 5] [--batch 32] [--prep-ms 20] [--quick]

Overhead: two runs of ``signal-tiny`` (full fine-tuning, AdamW, clipping at 1.0, the demo's SFT learning rate), one
in a local engine in this process and one on a ``signal serve`` subprocess on 127.0.0.1, fed the same batches — the
demo's SFT batches (``--batch`` prompt/response texts, 32 as in ``signal demo``), tokenized by the engine. Each step
awaits ``forward_backward`` then ``optim_step`` (no pipelining: the worst case for the network). Local and remote
steps are interleaved step by step (local, remote, remote, local, ...) so slow drifts of a shared machine hit both
alike; the headline is the median over steps of the per-step time ratio. The two runs compute the same losses
(the benchmark checks they are equal): the remote step does exactly the local step's work plus the protocol.

Pipelining (remote): the client prepares each step's batch, optionally after an I/O-bound wait (``--prep-ms``),
and either awaits each request (sequential) or queues them and awaits the futures at the end (pipelined).

Writes ``benchmarks/results/remote_overhead_<device>.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch

from . import save_study
from .api_overhead import timed_steps


def _batches(n: int, size: int, seed: int = 0) -> list[list[dict]]:
    from signalrl.demo import make_prompt, sft_response

    rng = random.Random(seed)
    return [[{"prompt": make_prompt(rng), "response": sft_response(rng)} for _ in range(size)] for _ in range(n)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


RUN = dict(base_model="signal-tiny", lora_r=0, learning_rate=3e-3, max_grad_norm=1.0, seed=0)


async def overhead(local, remote, batches, warmup: int = 3):
    runs = [await c.create_run(**RUN) for c in (local, remote)]
    tcs = {"local": local.get_training_client(runs[0]["run_id"]),
           "remote": remote.get_training_client(runs[1]["run_id"])}

    async def step(tc, b):
        loss = (await tc.forward_backward(b, "causal_lm")).loss
        await tc.optim_step()
        return loss

    t = {"local": [], "remote": []}
    for i, b in enumerate(batches):
        got = {}
        for which in (("local", "remote") if i % 2 == 0 else ("remote", "local")):
            t0 = time.perf_counter()
            loss = await step(tcs[which], b)
            got[which] = (time.perf_counter() - t0, loss)
        if got["local"][1] != got["remote"][1]:
            raise RuntimeError(f"step {i}: local loss {got['local'][1]!r} != remote loss {got['remote'][1]!r}")
        if i >= warmup:
            for which in t:
                t[which].append(got[which][0])
    return t["local"], t["remote"]


async def _demo_block(tc, batches) -> tuple[float, list[float]]:
    """Seconds per step of ``signal demo``'s SFT loop over ``batches``: queue step k (``forward_backward_async`` +
    ``optim_step_async``), then wait for step k − 1's results; and the losses."""
    t0, pending, losses = time.perf_counter(), None, []
    for b in batches:
        fb = await tc.forward_backward_async(b, "causal_lm")
        st = await tc.optim_step_async()
        if pending is not None:
            losses.append((await pending[0]).loss)
            await pending[1]
        pending = (fb, st)
    losses.append((await pending[0]).loss)
    await pending[1]
    return (time.perf_counter() - t0) / len(batches), losses


async def demo_loop(local, remote, batches, block: int = 10, warmup: int = 5):
    """The demo's loop, local and remote, in blocks of ``block`` steps interleaved (local, remote, remote, local,
    ...): per-block seconds per step of each, and the ratios remote / local of each pair of blocks."""
    runs = [await c.create_run(**RUN) for c in (local, remote)]
    tcs = {"local": local.get_training_client(runs[0]["run_id"]),
           "remote": remote.get_training_client(runs[1]["run_id"])}
    for which in tcs:
        await _demo_block(tcs[which], batches[:warmup])
    t: dict[str, list[float]] = {"local": [], "remote": []}
    ratios = []
    for i, k in enumerate(range(warmup, len(batches) - block + 1, block)):
        got = {}
        for which in (("local", "remote") if i % 2 == 0 else ("remote", "local")):
            got[which] = await _demo_block(tcs[which], batches[k:k + block])
        if got["local"][1] != got["remote"][1]:
            raise RuntimeError(f"block {i}: local and remote losses differ")
        for which in t:
            t[which].append(got[which][0])
        ratios.append(got["remote"][0] / got["local"][0])
    return t["local"], t["remote"], ratios


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux ``/proc``), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def cpu_per_step(client, batches, server_pid: int | None, **config) -> tuple[float, float | None, float | None]:
    """Wall ms, this process's CPU ms and the server's CPU ms per step, over ``batches`` (after 3 warm-up steps)."""
    run = await client.create_run(**RUN, **config)
    tc = client.get_training_client(run["run_id"])
    for b in batches[:3]:
        await tc.forward_backward(b, "causal_lm")
        await tc.optim_step()
    s0, c0, t0 = _cpu_s(server_pid) if server_pid else None, _cpu_s(os.getpid()), time.perf_counter()
    for b in batches[3:]:
        await tc.forward_backward(b, "causal_lm")
        await tc.optim_step()
    n = len(batches) - 3
    wall = (time.perf_counter() - t0) / n * 1e3
    c1, s1 = _cpu_s(os.getpid()), _cpu_s(server_pid) if server_pid else None
    return wall, None if c0 is None else (c1 - c0) / n * 1e3, None if s0 is None else (s1 - s0) / n * 1e3


async def pipeline(client, batches, pipelined: bool, prep_ms: float) -> tuple[float, list[float]]:
    run = await client.create_run(**RUN)
    return await timed_steps(client.get_training_client(run["run_id"]), batches, pipelined, prep_ms)


def _start_server(root: str, args) -> tuple:
    import re
    import subprocess

    import httpx

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("TRITON_INTERPRET", None)
    log_path = os.path.join(root, "serve.log")  # a file, not a pipe: nobody reads a pipe once the server is up
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "signalrl.cli", "serve", "--root", root, "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    url = None
    with open(log_path) as out:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = out.readline()
            if not line:
                time.sleep(0.05)
            m = re.search(r"Signal server on (http://\S+)", line or "")
            url = m.group(1) if m else url
    while url is not None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"signal serve did not start (its output: {log_path})")


async def main_async(args) -> str:
    from signalrl.client import AsyncSignalClient
    from signalrl.engine import Engine
    from signalrl.server import auth
    from signalrl.server.store import Store

    root = tempfile.mkdtemp(prefix="signal-remote-bench-")
    _, key = auth.create_key(Store(os.path.join(root, "signal.db")), "bench")
    proc, url = _start_server(root, args)
    try:
        local = AsyncSignalClient(engine=Engine(tempfile.mkdtemp(prefix="signal-local-bench-")))
        remote = AsyncSignalClient(base_url=url, api_key=key)
        n = args.steps * args.repeats
        t_local, t_remote = await overhead(local, remote, _batches(n + 3, args.batch))
        ratios = [r / lo for r, lo in zip(t_remote, t_local)]
        cpu_rows = [(name, await cpu_per_step(c, _batches(63, args.batch, seed=7), pid, **cfg)) for name, c, pid, cfg in
                    (("local", local, None, {}), ("remote", remote, proc.pid, {}),
                     ("remote, no automatic checkpoints", remote, proc.pid, {"checkpoint_every": 10 ** 9}))]
        larger = []  # the same at larger batches: the fixed cost of a request, against a longer step
        for b in args.larger:
            tl, tr = await overhead(local, remote, _batches(max(10, n // 3) + 3, b, seed=b))
            larger.append((b, statistics.median(tl), statistics.median(tr),
                           statistics.median([r / lo for r, lo in zip(tr, tl)])))
        demo = await demo_loop(local, remote, _batches(5 + 10 * max(4, n // 5), args.batch, seed=11))
        rows = []
        for prep in sorted({0.0, args.prep_ms}):
            res = {}
            for name, client in (("local", local), ("remote", remote)):
                seq_t, par_t = [], []
                for r in range(args.repeats):
                    bs = _batches(args.steps, args.batch, seed=100 + r)
                    ts, ls = await pipeline(client, bs, False, prep)
                    tp, lp = await pipeline(client, bs, True, prep)
                    assert ls == lp, "pipelined and sequential loops must compute identical losses"
                    seq_t.append(args.steps / ts)
                    par_t.append(args.steps / tp)
                res[name] = (statistics.median(seq_t), statistics.median(par_t))
            rows.append((prep, res))
        await remote.close()
        await local.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)

    lo, re_ = statistics.median(t_local), statistics.median(t_remote)
    over = (statistics.median(ratios) - 1) * 100
    over_mean = (statistics.mean(t_remote) / statistics.mean(t_local) - 1) * 100
    cpu = platform.processor() or platform.machine()
    cmd = (f"python -m benchmarks.remote_overhead --steps {args.steps} --repeats {args.repeats} --batch {args.batch} "
           f"--prep-ms {args.prep_ms:g} --threads {args.threads} --larger {' '.join(map(str, args.larger))}")
    lines = [
        "# Remote client overhead (cpu, loopback)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}, {os.cpu_count()} cores (shared); "
        f"torch {torch.__version__} ({args.threads} thread(s) per process), Python {platform.python_version()}; model signal-tiny, full fine-tuning, AdamW, "
        f"the demo's SFT batches ({args.batch} prompt/response texts, tokenized by the engine), causal_lm. Server: "
        "`signal serve` in a subprocess on 127.0.0.1 with its defaults (automatic checkpoint every 10 steps, "
        "counted in the remote times).",
        f"{len(t_local)} steps of each (forward_backward + optim_step, each awaited), interleaved step by step after 3 "
        "warm-up steps; every step's loss is identical locally and remotely.",
        "",
        "| client | median ms / step | p20–p80 ms / step | mean ms / step |",
        "|---|---:|---:|---:|",
        f"| local engine (in process) | {lo * 1e3:.2f} | {_pct(t_local, .2) * 1e3:.2f}–{_pct(t_local, .8) * 1e3:.2f} "
        f"| {statistics.mean(t_local) * 1e3:.2f} |",
        f"| remote (HTTP, loopback) | {re_ * 1e3:.2f} | {_pct(t_remote, .2) * 1e3:.2f}–{_pct(t_remote, .8) * 1e3:.2f} "
        f"| {statistics.mean(t_remote) * 1e3:.2f} |",
        "",
        f"**Remote overhead: {over:+.1f}%** per step ({(re_ - lo) * 1e3:+.2f} ms; median of the per-step ratios "
        f"remote / local; p20–p80 of the ratios {(_pct(ratios, .2) - 1) * 100:+.1f}% to "
        f"{(_pct(ratios, .8) - 1) * 100:+.1f}%; ratio of the means {over_mean:+.1f}%; goal ≤ 10%).",
        "",
        "Where the time goes (60 more steps of each, not interleaved; CPU from /proc, 10 ms ticks):",
        "",
        "| client | wall ms / step | client process CPU ms / step | server process CPU ms / step |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {w:.2f} | {'n/a' if c is None else f'{c:.1f}'} | "
          f"{'—' if name == 'local' else ('n/a' if sv is None else f'{sv:.1f}')} |" for name, (w, c, sv) in cpu_rows],
        "",
        "(The server's automatic checkpoint — every 10 optimizer steps by default, tens of milliseconds of file "
        "writes and fsyncs each — lands on one step in ten: it shows in the means and in the steps/s below, hardly in "
        "the medians; the last row is the same remote run with it turned off.)",
        "",
        "The cost is a fixed few milliseconds per request (two per step here: HTTP on both sides, the request log), "
        "so its share falls as the step grows — the same measurement at larger batches "
        f"({max(10, n // 3)} interleaved steps each):",
        "",
        "| batch | local median ms / step | remote median ms / step | overhead (median of ratios) |",
        "|---:|---:|---:|---:|",
        f"| {args.batch} | {lo * 1e3:.2f} | {re_ * 1e3:.2f} | {over:+.1f}% |",
        *[f"| {b} | {tl * 1e3:.2f} | {tr * 1e3:.2f} | {(r - 1) * 100:+.1f}% |" for b, tl, tr, r in larger],
        "",
        "## The demo's own loop",
        "",
        f"`signal demo`'s SFT loop queues step k (`forward_backward_async` + `optim_step_async`) and then waits for "
        f"step k − 1's results. The same loop locally and remotely, in {len(demo[2])} blocks of 10 steps each, "
        "interleaved block by block (identical losses):",
        "",
        "| client | median ms / step | p20–p80 ms / step |",
        "|---|---:|---:|",
        *[f"| {name} | {statistics.median(ts) * 1e3:.2f} | {_pct(ts, .2) * 1e3:.2f}–{_pct(ts, .8) * 1e3:.2f} |"
          for name, ts in (("local engine", demo[0]), ("remote (HTTP, loopback)", demo[1]))],
        "",
        f"**Overhead of the demo's loop: {(statistics.median(demo[2]) - 1) * 100:+.1f}%** (median of the per-block "
        f"ratios; p20–p80 {(_pct(demo[2], .2) - 1) * 100:+.1f}% to {(_pct(demo[2], .8) - 1) * 100:+.1f}%). Queued "
        "requests cost two exchanges each (submission, then the result's long-poll), which the server's event loop "
        "handles while its engine worker computes the step before; both hold the interpreter lock for their Python "
        "work, so the loop's share is not hidden behind the step.",
        "",
        "## Pipelining with futures (steps / s, median of rounds)",
        "",
        f"{args.repeats} rounds of {args.steps} steps each; sequential awaits every call, pipelined queues "
        "`forward_backward_async` + `optim_step_async` and awaits the futures at the end (identical losses).",
        "",
        "| client preparation per step | client | sequential | pipelined | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for prep, res in rows:
        for name in ("local", "remote"):
            s, p = res[name]
            lines.append(f"| {prep:g} ms | {name} | {s:.1f} | {p:.1f} | **{p / s:.2f}×** |")
    lines += [
        "",
        "## Reading",
        "",
        "- Every step's loss is bit-identical locally and remotely: the remote step does the local step's work, plus "
        "per request the protocol — JSON (or safetensors) encoding on both sides, one HTTP exchange (a prebuilt "
        "httpx request on httpx's synchronous keep-alive pool, on a pool thread while the caller's loop awaits it; "
        "FastAPI on uvicorn with uvloop/httptools, the two routes of a step as plain Starlette routes), "
        "authentication, two SQLite commits (accepted and queued in one; the result) and two thread hand-offs on "
        "each side (server: event loop → engine worker → event loop, the result handed over in memory; client: "
        "event loop → pool thread → event loop). The CPU table shows it: the server process spends the local step's "
        "compute plus its share, the client process the rest.",
        "- A step of `forward_backward` + `optim_step`, each awaited, is two such exchanges, so the share is large for "
        "a step this small (signal-tiny at batch 32 computes in about 15–20 ms on one CPU thread) and falls with the "
        "step's size (the larger batches above); for a model on a GPU the fixed cost is the same few milliseconds.",
        "- Pipelining overlaps the client's preparation and the protocol with the server's work. A pipelined request "
        "costs two exchanges (the submission returns at once, then a long-poll for its result) against one for an "
        "awaited call, and the server's event loop shares the interpreter lock with its engine worker: while an "
        "exchange cost milliseconds (before the changes of docs/server.md, \"Overhead\"), that made pipelining "
        "with no preparation slower than awaiting each call (0.82×).",
        "- What is left is about two milliseconds per request, none of it dominant: httpx's exchange on the client "
        "(its send, and the receive and parse of the answer: about 0.4 ms of client CPU an exchange on this machine "
        "with httpx's synchronous stack on a pool thread, 0.5 ms with its asynchronous one on the caller's loop), "
        "uvicorn's and Starlette's layers on the server, and a dozen steps of 50–300 µs each (encoding, "
        "authentication, decoding, the accept and result commits, four thread hand-offs, the answer), each several "
        "times slower after the model's step has evicted the CPU caches. docs/server.md (\"Overhead\") has the "
        "per-segment timeline and why that stays above the 10% goal at batch 32 on this machine.",
        "- CPU timings on a shared 2-core machine are noisy (other jobs ran beside this one); compare medians within "
        "one run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prep-ms", type=float, default=20.0)
    p.add_argument("--larger", type=int, nargs="*", default=[128, 512], help="larger batches, overhead only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each side (1: no OpenMP stalls on a busy shared machine)")
    p.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/remote_overhead_cpu.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.larger = 4, 1, [64]
    torch.set_num_threads(args.threads)
    text = asyncio.run(main_async(args))
    print(text)
    save_study(text, args.out, "remote_overhead_cpu.md", args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

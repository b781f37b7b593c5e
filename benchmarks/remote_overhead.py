"""Overhead of the remote client: the same training steps through ``signal serve`` on loopback versus the local
engine in this process, and the speed-up from pipelining with futures across the network.

    python -m benchmarks.remote_overhead [--steps 30] [--repeats 5] [--batch 32] [--prep-ms 20]
        [--engine process thread] [--demo-block 80] [--demo-blocks 12] [--quick]

Overhead: two runs of ``signal-tiny`` (full fine-tuning, AdamW, clipping at 1.0, the demo's SFT learning rate), one
in a local engine in this process and one on a ``signal serve`` subprocess on 127.0.0.1, fed the same batches — the
demo's SFT batches (``--batch`` prompt/response texts, 32 as in ``signal demo``), tokenized by the engine. Each step
awaits ``forward_backward`` then ``optim_step`` (no pipelining: the worst case for the network). Local and remote
steps are interleaved step by step (local, remote, remote, local, ...) so slow drifts of a shared machine hit both
alike; the headline is the median over steps of the per-step time ratio. The two runs compute the same losses
(the benchmark checks they are equal): the remote step does exactly the local step's work plus the protocol.

The demo's loop: ``signal demo``'s SFT loop (queue step k, then wait for step k − 1) in blocks of its SFT stage's
length, local and remote interleaved block by block; once against a local run without checkpoints, once against
one that saves a checkpoint every 10 steps as the server does by default (like for like).

Every figure is taken for each ``--engine`` of the server (``process``, the default, and ``thread``), one server
after the other, against the same local engine.

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

from signalrl.demo.stages import Settings as DemoSettings

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


async def demo_loop(local, remote, batches, block: int = 10, warmup: int = 5, local_config: dict | None = None):
    """The demo's loop, local and remote, in blocks of ``block`` steps interleaved (local, remote, remote, local,
    ...): per-block seconds per step of each, and the ratios remote / local of each pair of blocks.
    ``local_config``: more of the local run's configuration (``checkpoint_every``: the server's checkpoints)."""
    runs = [await local.create_run(**RUN, **(local_config or {})), await remote.create_run(**RUN)]
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


def _cpu_s(pid: int, children: bool = True) -> float | None:
    """User + system CPU seconds of a process and (``children``) of its children that are still running (a server
    and its engine process; Linux ``/proc``), else None."""
    def one(p: int) -> tuple[float, int]:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1])
    try:
        total = one(pid)[0]
    except (OSError, ValueError, IndexError):
        return None
    for d in os.listdir("/proc") if children else ():
        if d.isdigit() and int(d) != pid:
            try:
                cpu, parent = one(int(d))
            except (OSError, ValueError, IndexError):
                continue
            total += cpu if parent == pid else 0.0
    return total


async def cpu_per_step(client, batches, server_pid: int | None, **config) -> tuple[float, float | None, float | None]:
    """Wall ms, this process's CPU ms and the server's CPU ms per step, over ``batches`` (after 3 warm-up steps)."""
    run = await client.create_run(**RUN, **config)
    tc = client.get_training_client(run["run_id"])
    for b in batches[:3]:
        await tc.forward_backward(b, "causal_lm")
        await tc.optim_step()
    me = os.getpid()  # (a server started by this process is its child: not counted as the client's)
    s0, c0, t0 = _cpu_s(server_pid) if server_pid else None, _cpu_s(me, False), time.perf_counter()
    for b in batches[3:]:
        await tc.forward_backward(b, "causal_lm")
        await tc.optim_step()
    n = len(batches) - 3
    wall = (time.perf_counter() - t0) / n * 1e3
    c1, s1 = _cpu_s(me, False), _cpu_s(server_pid) if server_pid else None
    return wall, None if c0 is None else (c1 - c0) / n * 1e3, None if s0 is None else (s1 - s0) / n * 1e3


async def pipeline(client, batches, pipelined: bool, prep_ms: float) -> tuple[float, list[float]]:
    run = await client.create_run(**RUN)
    return await timed_steps(client.get_training_client(run["run_id"]), batches, pipelined, prep_ms)


def _start_server(root: str, args, engine: str = "process") -> tuple:
    import re
    import subprocess

    import httpx

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("TRITON_INTERPRET", None)
    log_path = os.path.join(root, "serve.log")  # a file, not a pipe: nobody reads a pipe once the server is up
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "signalrl.cli", "serve", "--root", root, "--port", "0",
                                 "--engine", engine], stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
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


ENGINE_NAMES = {"process": "engine process (default)", "thread": "engine thread (`--engine thread`)"}


async def measure(local, remote, proc, args) -> dict:
    """Every figure of one server against the local engine."""
    n = args.steps * args.repeats
    out: dict = {}
    out["local"], out["remote"] = await overhead(local, remote, _batches(n + 3, args.batch))
    out["ratios"] = [r / lo for r, lo in zip(out["remote"], out["local"])]
    out["cpu"] = [await cpu_per_step(remote, _batches(63, args.batch, seed=7), proc.pid),
                  await cpu_per_step(remote, _batches(63, args.batch, seed=7), proc.pid, checkpoint_every=10 ** 9)]
    out["larger"] = []  # the same at larger batches: the fixed cost of a request, against a longer step
    for b in args.larger:
        tl, tr = await overhead(local, remote, _batches(max(10, n // 3) + 3, b, seed=b))
        out["larger"].append((b, statistics.median(tl), statistics.median(tr),
                              statistics.median([r / lo for r, lo in zip(tr, tl)])))
    demo_batches = _batches(5 + args.demo_block * args.demo_blocks, args.batch, seed=11)
    out["demo"] = await demo_loop(local, remote, demo_batches, args.demo_block)
    # like for like: the local run also saves a checkpoint every 10 optimizer steps, as the server does by default
    out["demo_ck"] = await demo_loop(local, remote, demo_batches, args.demo_block,
                                     local_config={"checkpoint_every": 10})
    out["pipe"] = {}
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
        out["pipe"][prep] = res
    return out


async def main_async(args) -> str:
    from signalrl.client import AsyncSignalClient
    from signalrl.engine import Engine
    from signalrl.server import auth
    from signalrl.server.store import Store

    local = AsyncSignalClient(engine=Engine(tempfile.mkdtemp(prefix="signal-local-bench-")))
    local_cpu = await cpu_per_step(local, _batches(63, args.batch, seed=7), None)
    res = {}
    for engine in args.engine:
        root = tempfile.mkdtemp(prefix="signal-remote-bench-")
        _, key = auth.create_key(Store(os.path.join(root, "signal.db")), "bench")
        proc, url = _start_server(root, args, engine)
        try:
            remote = AsyncSignalClient(base_url=url, api_key=key)
            res[engine] = await measure(local, remote, proc, args)
            await remote.close()
        finally:
            proc.kill()
            proc.wait(timeout=30)
    await local.close()
    return report(args, res, local_cpu)


def report(args, res: dict, local_cpu) -> str:
    n = args.steps * args.repeats
    first = res[args.engine[0]]
    cpu = platform.processor() or platform.machine()
    cmd = (f"python -m benchmarks.remote_overhead --steps {args.steps} --repeats {args.repeats} --batch {args.batch} "
           f"--prep-ms {args.prep_ms:g} --threads {args.threads} --larger {' '.join(map(str, args.larger))} "
           f"--demo-block {args.demo_block} --demo-blocks {args.demo_blocks} --engine {' '.join(args.engine)}")

    def over(r: dict) -> str:
        return f"{(statistics.median(r['ratios']) - 1) * 100:+.1f}%"

    def demo_over(r: dict) -> str:
        return f"{_over(r['demo'][2])} (like for like {_over(r['demo_ck'][2])})"

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:.2f}"

    def spread(xs: list[float], pct: bool = False) -> str:
        f = (lambda v: f"{(v - 1) * 100:+.1f}%") if pct else (lambda v: f"{v * 1e3:.2f}")
        return f"{f(_pct(xs, .2))} to {f(_pct(xs, .8))}" if pct else f"{f(_pct(xs, .2))}–{f(_pct(xs, .8))}"

    headline = "; ".join(f"{ENGINE_NAMES[e].split(' (')[0]} **{over(r)}** awaited, **{demo_over(r)}** in the "
                         "demo's loop" for e, r in res.items())
    lines = [
        "# Remote client overhead (cpu, loopback)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}, {os.cpu_count()} cores (shared); "
        f"torch {torch.__version__} ({args.threads} thread(s) per process), Python {platform.python_version()}; "
        f"model signal-tiny, full fine-tuning, AdamW, the demo's SFT batches ({args.batch} prompt/response texts, "
        "tokenized by the engine), causal_lm. Servers: `signal serve` in a subprocess on 127.0.0.1 with its "
        "defaults (automatic checkpoint every 10 steps, counted in the remote times), one after the other: "
        + ", ".join(f"`--engine {e}`" for e in res) + ".",
        "",
        f"Overhead per step at batch {args.batch}: {headline} (goal ≤ 10%).",
        "",
        f"## Awaited steps ({len(first['local'])} steps of each, `forward_backward` + `optim_step`, each awaited)",
        "",
        "Interleaved step by step with the local engine after 3 warm-up steps; every step's loss is identical "
        "locally and remotely. Overhead: the median of the per-step ratios remote / local.",
        "",
        "| server | local median ms / step | remote median ms / step | remote p20–p80 | overhead | p20–p80 of the "
        "ratios |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {ENGINE_NAMES[e]} | {ms(r['local'])} | {ms(r['remote'])} | {spread(r['remote'])} | **{over(r)}** | "
          f"{spread(r['ratios'], True)} |" for e, r in res.items()],
        "",
        "## The demo's own loop",
        "",
        "`signal demo`'s SFT loop queues step k (`forward_backward_async` + `optim_step_async`) and then waits for "
        f"step k − 1's results. The same loop locally and remotely, in {len(first['demo'][2])} blocks of "
        f"{args.demo_block} steps each (`signal demo`'s SFT stage is {DemoSettings.sft_steps} steps in a row), "
        "interleaved block by block "
        "(identical losses); overhead: the median of the per-block ratios. The server takes an automatic checkpoint "
        "every 10 optimizer steps (its default); the local run takes none, or (like for like) saves one every 10 "
        "steps too (`checkpoint_every=10`).",
        "",
        "| server | local run | local median ms / step | remote median ms / step | overhead | p20–p80 of the "
        "ratios |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {ENGINE_NAMES[e]} | {which} | {ms(r[k][0])} | {ms(r[k][1])} | **{_over(r[k][2])}** | "
          f"{spread(r[k][2], True)} |" for e, r in res.items()
          for k, which in (("demo", "no checkpoints"), ("demo_ck", "checkpoint every 10 steps"))],
        "",
        "## Where the time goes",
        "",
        "60 more awaited steps of each, not interleaved; CPU from /proc (10 ms ticks). The server's CPU counts the "
        "server process and its engine process.",
        "",
        "| client | wall ms / step | client process CPU ms / step | server CPU ms / step |",
        "|---|---:|---:|---:|",
        _cpu_row("local", local_cpu, local=True),
        *[_cpu_row(f"remote, {ENGINE_NAMES[e].split(' (')[0]}{extra}", r["cpu"][i])
          for e, r in res.items() for i, extra in ((0, ""), (1, ", no automatic checkpoints"))],
        "",
        "(The server's automatic checkpoint — every 10 optimizer steps by default, tens of milliseconds of file "
        "writes each — lands on one step in ten: it shows in the means and in the steps/s below, less in the "
        "medians.)",
        "",
        "The protocol's cost is a fixed few milliseconds per request, so its share falls as the step grows — the "
        f"same awaited measurement at larger batches ({max(10, n // 3)} interleaved steps each):",
        "",
        "| batch | server | local median ms / step | remote median ms / step | overhead |",
        "|---:|---|---:|---:|---:|",
        *[f"| {b} | {ENGINE_NAMES[e].split(' (')[0]} | {tl * 1e3:.2f} | {tr * 1e3:.2f} | {(q - 1) * 100:+.1f}% |"
          for e, r in res.items() for b, tl, tr, q in [(args.batch, statistics.median(r["local"]),
                                                        statistics.median(r["remote"]),
                                                        statistics.median(r["ratios"])), *r["larger"]]],
        "",
        "## Pipelining with futures (steps / s, median of rounds)",
        "",
        f"{args.repeats} rounds of {args.steps} steps each; sequential awaits every call, pipelined queues "
        "`forward_backward_async` + `optim_step_async` and awaits the futures at the end (identical losses).",
        "",
        "| client preparation per step | client | sequential | pipelined | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for prep in first["pipe"]:
        s_, p_ = first["pipe"][prep]["local"]
        lines.append(f"| {prep:g} ms | local | {s_:.1f} | {p_:.1f} | **{p_ / s_:.2f}×** |")
        for e, r in res.items():
            s_, p_ = r["pipe"][prep]["remote"]
            lines.append(f"| {prep:g} ms | remote, {ENGINE_NAMES[e].split(' (')[0]} | {s_:.1f} | {p_:.1f} | "
                         f"**{p_ / s_:.2f}×** |")
    lines += ["", *READING]
    return "\n".join(lines) + "\n"


def _over(ratios: list[float]) -> str:
    return f"{(statistics.median(ratios) - 1) * 100:+.1f}%"


def _cpu_row(name: str, row, local: bool = False) -> str:
    w, c, sv = row
    return (f"| {name} | {w:.2f} | {'n/a' if c is None else f'{c:.1f}'} | "
            f"{'—' if local else ('n/a' if sv is None else f'{sv:.1f}')} |")


READING = [
    "## Reading",
    "",
    "- Every step's loss is bit-identical locally and remotely: the remote step does the local step's work, plus "
    "per request the protocol — encoding on both sides, one HTTP exchange (httpx's keep-alive pool on the client; "
    "FastAPI on uvicorn with uvloop/httptools, the two routes of a step as plain Starlette routes), authentication, "
    "two SQLite commits (the request accepted and queued; its outcome) and the hand-offs between the server's event "
    "loop and its engine.",
    "- **Engine thread**: the event loop and the engine's worker share one interpreter lock, so the protocol's Python "
    "cannot overlap the model's; the server process is busy for the whole step plus its share, and the demo's "
    "pipelined loop gains nothing from pipelining on a step this small.",
    "- **Engine process** (the default): the engine runs in a child process that decodes and runs requests and "
    "records their outcomes; the server's process only accepts, orders and answers. The two processes run on the "
    "two cores at once, so a pipelined request's protocol is hidden behind the previous step's compute. An awaited "
    "call gains less: its exchange and the step are serial whatever the process layout, and it adds a hand-off over "
    "the socket pair to the engine process and back.",
    "- The server's automatic checkpoints (every 10 optimizer steps by default, so that a restart loses nothing) are "
    "work a local run does only when asked (`checkpoint_every`): the demo's-loop rows without local checkpoints "
    "count them as overhead, the like-for-like rows give the local run the same checkpoints and leave the protocol's "
    "own cost.",
    "- A step of `forward_backward` + `optim_step`, each awaited, is two exchanges, so the share is large for a step "
    "this small (signal-tiny at batch 32 computes in about 15–20 ms on one CPU thread) and falls with the step's "
    "size (the larger batches above); for a model on a GPU the fixed cost is the same few milliseconds.",
    "- CPU timings on a shared 2-core machine are noisy; compare medians within one run.",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prep-ms", type=float, default=20.0)
    p.add_argument("--larger", type=int, nargs="*", default=[128, 512], help="larger batches, overhead only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each side (1: no OpenMP stalls on a busy shared machine)")
    p.add_argument("--engine", nargs="+", choices=["process", "thread"], default=["process", "thread"],
                   help="the servers to measure (`signal serve --engine ...`), one after the other")
    p.add_argument("--demo-block", type=int, default=DemoSettings.sft_steps,
                   help="steps per block of the demo's loop (default: the demo's SFT stage)")
    p.add_argument("--demo-blocks", type=int, default=12, help="blocks of the demo's loop, each side")
    p.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/remote_overhead_cpu.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.larger, args.demo_block, args.demo_blocks = 4, 1, [64], 10, 4
    torch.set_num_threads(args.threads)
    text = asyncio.run(main_async(args))
    print(text)
    save_study(text, args.out, "remote_overhead_cpu.md", args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

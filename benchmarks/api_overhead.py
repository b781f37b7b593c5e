"""Overhead of the training API: ``forward_backward`` + ``optim_step`` through the local client versus a
hand-written PyTorch loop doing the same work on the same model, and the speed-up from pipelining.

    python -m benchmarks.api_overhead [--model signal-tiny] [--steps 30] [--repeats 10] [--prep-ms 20] [--quick]

Overhead: both sides run the same loss (the registry's ``causal_lm`` on a ``PolicyModel``), the same batches
(pre-tokenized tensors, so tokenization is not counted), AdamW, gradient clipping at 1.0, full fine-tuning, from
identical weights. The hand loop is ``loss.backward(); clip_grad_norm_; step; zero_grad``; the client awaits each
``forward_backward`` and ``optim_step`` in turn (the worst case for the API: no pipelining). The two are
interleaved step by step (hand, client, client, hand, ...) for ``steps x repeats`` steps after a warm-up, so slow
drifts of a shared machine hit both alike; the headline is the median over steps of the per-pair time ratio.
Both sides see identical batches from identical weights, so their losses must agree: the benchmark checks it.

Pipelining: the client prepares each step's batch from text (the work a data loader does), with or without
an I/O-bound wait, and either awaits each request before preparing the next (sequential) or queues requests
and awaits them at the end (pipelined, double-await futures). Both compute exactly the same losses (FIFO).

Writes ``benchmarks/results/api_overhead_<device>.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time

import torch


def _batch(B: int, T: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[B // 2:, T - T // 4:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


class HandLoop:
    """The hand-written PyTorch loop: the same model, loss, optimizer and clipping as a client run."""

    def __init__(self, model_name: str, lr: float, device: str):
        from signalrl.engine.models import load_base_model
        from signalrl.losses import get_loss
        from signalrl.losses.model import PolicyModel

        self.model, _ = load_base_model(model_name, device=device, seed=0)
        self.model.train()
        self.policy = PolicyModel(self.model)
        self.spec = get_loss("causal_lm")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        res = self.spec(self.policy, batch)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(res.loss.detach())


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def measure_overhead(client, model_name: str, batches, n_steps: int, device: str, warmup: int = 3,
                           checked: int = 10):
    """Interleaved per-step times (seconds) of the hand loop and the client, and the largest relative
    difference of their losses over the first ``checked`` steps (later, rounding differences of the two
    clipping codes compound through AdamW and the trajectories drift apart slowly)."""
    lr = 1e-3
    hand = HandLoop(model_name, lr, device)
    run = await client.create_run(base_model=model_name, lora_r=0, learning_rate=lr, max_grad_norm=1.0, seed=0,
                                  device=device)
    tc = client.get_training_client(run["run_id"])
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    async def api_step(b) -> float:
        loss = (await tc.forward_backward(b, "causal_lm")).loss
        await tc.optim_step()
        return loss

    t_hand, t_api, loss_diff = [], [], 0.0
    for i in range(warmup + n_steps):
        b = batches[i % len(batches)]
        times = {}
        for which in (("hand", "api") if i % 2 == 0 else ("api", "hand")):
            _sync(device)
            t0 = time.perf_counter()
            loss = hand.step(b) if which == "hand" else await api_step(b)
            _sync(device)
            times[which] = (time.perf_counter() - t0, loss)
        (th, lh), (ta, la) = times["hand"], times["api"]
        if i < checked:
            loss_diff = max(loss_diff, abs(la - lh) / max(abs(lh), 1e-12))
        if i >= warmup:
            t_hand.append(th)
            t_api.append(ta)
    return t_hand, t_api, loss_diff


def _text_batch(rng: random.Random, n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [{"prompt": "Words:", "response": " " + " ".join(rng.choices(words, k=12))} for _ in range(n)]


async def timed_steps(tc, batches, pipelined: bool, prep_ms: float = 0.0) -> tuple[float, list[float]]:
    """Seconds for ``forward_backward`` + ``optim_step`` on each of ``batches`` (awaited one by one, or queued as
    futures and awaited at the end), after ``prep_ms`` of simulated I/O-bound preparation per step; and the losses."""
    t0 = time.perf_counter()
    losses, pending = [], []
    for batch in batches:
        if prep_ms:
            await asyncio.sleep(prep_ms / 1e3)  # I/O-bound preparation: loading data, a remote reward service
        if pipelined:
            pending.append(await tc.forward_backward_async(batch, "causal_lm"))
            pending.append(await tc.optim_step_async())
        else:
            losses.append((await tc.forward_backward(batch, "causal_lm")).loss)
            await tc.optim_step()
    if pipelined:
        losses = [(await f).loss for f in pending[::2]]
        for f in pending[1::2]:
            await f
    return time.perf_counter() - t0, losses


async def pipeline_loop(client, model_name: str, steps: int, B: int, pipelined: bool, device: str,
                        prep_ms: float = 0.0):
    run = await client.create_run(base_model=model_name, lora_r=0, learning_rate=1e-3, seed=0, device=device)
    tc = client.get_training_client(run["run_id"])
    rng = random.Random(0)
    return await timed_steps(tc, (_text_batch(rng, B) for _ in range(steps)), pipelined, prep_ms)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def run(args) -> str:
    from signalrl.client import AsyncSignalClient
    from signalrl.engine import Engine
    from signalrl.engine.models import BUILTIN_MODELS, builtin_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab = builtin_config(args.model).vocab_size if args.model in BUILTIN_MODELS else 32000
    batches = [_batch(args.batch, args.seq, vocab, s) for s in range(args.steps)]
    engine = Engine(tempfile.mkdtemp(prefix="signal-bench-"))
    client = AsyncSignalClient(engine=engine)

    t_hand, t_api, loss_diff = await measure_overhead(client, args.model, batches, args.steps * args.repeats, device)
    if not loss_diff < 1e-4:
        raise RuntimeError(f"the hand loop and the client computed different losses (max relative difference "
                           f"{loss_diff:.3g}): they are not doing the same work")
    ratios = [a / h for a, h in zip(t_api, t_hand)]
    h, a = statistics.median(t_hand), statistics.median(t_api)
    overhead = (statistics.median(ratios) - 1) * 100
    overhead_mean = (statistics.mean(t_api) / statistics.mean(t_hand) - 1) * 100
    r20, r80 = (_percentile(ratios, q) for q in (0.2, 0.8))

    pipe_rows = []
    for prep in (0.0, args.prep_ms):
        seq_t, par_t, sp = [], [], []
        for r in range(args.repeats):
            t_s, l_s = await pipeline_loop(client, args.model, args.steps, args.batch, False, device, prep)
            t_p, l_p = await pipeline_loop(client, args.model, args.steps, args.batch, True, device, prep)
            assert l_s == l_p, "pipelined and sequential loops must compute identical losses"
            seq_t.append(t_s / args.steps)
            par_t.append(t_p / args.steps)
            sp.append(t_s / t_p)
        pipe_rows.append((prep, statistics.median(seq_t), statistics.median(par_t), statistics.median(sp)))
    engine.close()

    from signalrl.bench.runner import device_name

    dev_name = device_name(torch.device(device))
    lines = [
        f"# Training API overhead ({device})",
        "",
        f"Command: `python -m benchmarks.api_overhead --model {args.model} --steps {args.steps} "
        f"--repeats {args.repeats} --batch {args.batch} --seq {args.seq} --prep-ms {args.prep_ms:g}`",
        f"Device: {dev_name}; torch {torch.__version__}; "
        f"model {args.model}, full fine-tuning, AdamW, batch {args.batch}×{args.seq} tokens, causal_lm.",
        f"{len(t_hand)} steps of each (forward_backward + optim_step), interleaved step by step after 3 warm-up "
        f"steps; over the first 10 steps the losses of the two agree to {loss_diff:.1e} (relative).",
        "",
        "| loop | median ms / step | p20–p80 ms / step | mean ms / step |",
        "|---|---:|---:|---:|",
        f"| hand-written PyTorch (same loss, same model) | {h * 1e3:.2f} | {_percentile(t_hand, 0.2) * 1e3:.2f}–"
        f"{_percentile(t_hand, 0.8) * 1e3:.2f} | {statistics.mean(t_hand) * 1e3:.2f} |",
        f"| AsyncSignalClient, awaiting each call | {a * 1e3:.2f} | {_percentile(t_api, 0.2) * 1e3:.2f}–"
        f"{_percentile(t_api, 0.8) * 1e3:.2f} | {statistics.mean(t_api) * 1e3:.2f} |",
        "",
        f"**API overhead: {overhead:+.1f}%** (median of the per-step ratios client / hand; p20–p80 of the ratios "
        f"{(r20 - 1) * 100:+.1f}% to {(r80 - 1) * 100:+.1f}%; ratio of the means {overhead_mean:+.1f}%; "
        "goal ≤ 5%).",
        "",
        "## Pipelining with futures",
        "",
        "Each step the client prepares a text batch (tokenized by the engine), optionally after an I/O-bound wait "
        "(`asyncio.sleep`, standing for data loading or a remote reward service). Sequential: "
        "`await tc.forward_backward(...)` then `await tc.optim_step()`; pipelined: "
        "`fut = await tc.forward_backward_async(...)`, all awaited at the end. Losses are identical (FIFO).",
        "",
        "| client preparation per step | sequential ms / step | pipelined ms / step | speed-up (median of rounds) |",
        "|---|---:|---:|---:|",
    ] + [f"| {prep:.0f} ms | {sq * 1e3:.2f} | {pp * 1e3:.2f} | **{spd:.2f}×** |" for prep, sq, pp, spd in pipe_rows] + [
        "",
    ]
    if not device.startswith("cuda"):
        lines.append("CPU timings on a shared machine are noisy; compare the medians, not single rounds.")
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="signal-tiny")
    parser.add_argument("--steps", type=int, default=30, help="distinct batches; steps per pipelining round")
    parser.add_argument("--repeats", type=int, default=10, help="overhead: steps x repeats interleaved steps; "
                        "pipelining: rounds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--prep-ms", type=float, default=20.0, help="simulated I/O-bound client work per step")
    parser.add_argument("--quick", action="store_true", help="steps=5, repeats=1 (smoke test)")
    parser.add_argument("--out", default=None, help="markdown output (default benchmarks/results/api_overhead_<dev>.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 4, 1
    if args.out is None and not args.quick:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"api_overhead_{dev}.md")
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

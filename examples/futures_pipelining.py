"""Futures: queue work without waiting, so the engine never idles between requests.

    python examples/futures_pipelining.py [--quick]

``fut = await tc.forward_backward_async(...)`` returns as soon as the request is queued; ``await fut``
returns its result. Requests of a run always execute in submission order, so a pipelined loop computes
exactly what the sequential loop computes — it just lets the client prepare the next batch (here:
tokenizing text) while the engine works.
"""
import argparse
import asyncio
import os
import random
import time

from signalrl.client import AsyncSignalClient, FutureGroup


def make_batch(rng: random.Random, n: int = 16) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [{"prompt": "Words:", "response": " " + " ".join(rng.choices(words, k=8))} for _ in range(n)]


async def sequential(tc, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        result = await tc.forward_backward(make_batch(rng), "causal_lm")  # wait for each request
        await tc.optim_step()
        losses.append(result.loss)
    return losses


async def pipelined(tc, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    pending = []
    for _ in range(steps):
        fb = await tc.forward_backward_async(make_batch(rng), "causal_lm")  # queued, not finished
        pending.append(fb)
        pending.append(await tc.optim_step_async())
    results = await FutureGroup(pending).wait_all()
    return [r.loss for r in results[::2]]


async def main(quick: bool = False) -> dict:
    client = AsyncSignalClient()
    steps = 4 if quick else 30
    timings, losses = {}, {}
    for mode, loop in (("sequential", sequential), ("pipelined", pipelined)):
        run = await client.create_run(base_model="signal-tiny", lora_r=0, learning_rate=1e-3, seed=0)
        tc = client.get_training_client(run["run_id"])
        t0 = time.perf_counter()
        losses[mode] = await loop(tc, steps, seed=1)
        timings[mode] = time.perf_counter() - t0
        print(f"{mode:>10}: {steps} steps in {timings[mode]:.2f} s, final loss {losses[mode][-1]:.4f}")
    assert losses["sequential"] == losses["pipelined"], "FIFO order makes both loops compute the same thing"
    print(f"identical losses; pipelining speed-up {timings['sequential'] / timings['pipelined']:.2f}x")

    # wait_any: react to whichever of several independent runs finishes first.
    runs = [await client.create_run(base_model="signal-tiny", lora_r=8) for _ in range(2)]
    group = FutureGroup([await client.get_training_client(r["run_id"]).forward_async(make_batch(random.Random(2)),
                                                                                      "causal_lm") for r in runs])
    index, first = await group.wait_any()
    print(f"first finished: request {index} (loss {first.loss:.4f}); all: "
          f"{[round(r.loss, 4) for r in await group.wait_all()]}")
    return timings


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("SIGNAL_EXAMPLES_QUICK")))
    asyncio.run(main(parser.parse_args().quick))

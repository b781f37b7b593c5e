"""Double-await futures, FIFO order per run, FutureGroup, the sync client, a free event loop."""
import asyncio
import time

import pytest

from signalrl.client import APIFuture, FutureGroup

run_async = asyncio.run


def test_double_await_and_fifo_order(client, sft_batch):
    async def main():
        run = await client.create_run(lora_r=4, lora_alpha=8, learning_rate=1e-2)
        tc = client.get_training_client(run["run_id"])
        order, futs, kinds = [], [], []
        for i in range(12):
            if i % 3 == 2:
                fut = await tc.optim_step_async()
                kinds.append("step")
            else:
                fut = await tc.forward_backward_async(sft_batch, "causal_lm")
                kinds.append("fb")
            assert isinstance(fut, APIFuture)
            fut.add_done_callback(lambda f, i=i: order.append(i))
            futs.append(fut)
        results = [await f for f in futs]
        return order, kinds, results, await tc.queue_stats()

    order, kinds, results, stats = run_async(main())
    assert order == list(range(12))  # completion order == submission order
    steps_done = 0
    for kind, res in zip(kinds, results):
        if kind == "fb":
            assert res.step == steps_done  # sees exactly the optimizer steps submitted before it
        else:
            steps_done += 1
            assert res.step == steps_done
    assert stats["completed"] == 13 and stats["pending"] == 0 and stats["failed"] == 0  # + create_run


def test_future_group_wait_all_and_any(client, sft_batch):
    async def main():
        run = await client.create_run(lora_r=4)
        tc = client.get_training_client(run["run_id"])
        group = FutureGroup()
        for _ in range(3):
            group.add(await tc.forward_async(sft_batch, "causal_lm"))
        first = await group.wait_any()
        all_ = await group.wait_all()
        return first, all_

    (idx, res), all_ = run_async(main())
    assert idx == 0 and res.loss == all_[0].loss  # FIFO: the first queued finishes first
    assert len(all_) == 3 and all(r.loss == all_[0].loss for r in all_)  # forward changes nothing


def test_wait_all_raises_first_error_unless_collected(client, sft_batch):
    async def main():
        run = await client.create_run(lora_r=4)
        tc = client.get_training_client(run["run_id"])
        g = FutureGroup([await tc.forward_async(sft_batch, "causal_lm"),
                         await tc.forward_async(sft_batch, "no_such_loss"),
                         await tc.forward_async(sft_batch, "causal_lm")])
        collected = await g.wait_all(return_exceptions=True)
        with pytest.raises(ValueError, match="no_such_loss"):
            await g.wait_all()
        return collected

    collected = run_async(main())
    assert isinstance(collected[1], ValueError) and collected[2].loss == collected[0].loss


def test_event_loop_is_not_blocked(client, sft_batch):
    async def main():
        run = await client.create_run(lora_r=0)
        tc = client.get_training_client(run["run_id"])
        big = [{"text": "x" * 200}] * 16
        futs = [await tc.forward_backward_async(big, "causal_lm") for _ in range(4)]
        ticks = 0
        t0 = time.perf_counter()
        while not all(f.done() for f in futs):
            await asyncio.sleep(0.001)
            ticks += 1
        return ticks, time.perf_counter() - t0

    ticks, elapsed = run_async(main())
    assert elapsed > 0.05 and ticks >= 10  # the loop kept running while the worker computed


def test_sync_client_returns_futures(sync_client, sft_batch):
    client = sync_client
    run = client.create_run(lora_r=4, learning_rate=1e-2).result()
    tc = client.get_training_client(run["run_id"])
    f1 = tc.forward_backward(sft_batch, "causal_lm")
    f2 = tc.optim_step()
    f3 = tc.forward(sft_batch, "causal_lm")
    assert isinstance(f1, APIFuture)
    r1, r2, r3 = f1.result(), f2.result(), f3.result()
    assert r2.step == 1 and r3.step == 1 and r3.loss < r1.loss
    group = FutureGroup([tc.sample(["hi"], max_tokens=3), tc.sample(["yo"], max_tokens=3)])
    a, b = group.results()
    assert len(a.flat()[0].tokens) <= 3 and group.first()[0] == 0
    assert client.get_run(run["run_id"])["step"] == 1
    assert run["run_id"] in [r["run_id"] for r in client.list_runs()]

"""8 concurrent remote clients on 2 runs, through a real server on 127.0.0.1: every client's requests execute in
its own order, nothing deadlocks, and all of it finishes in bounded time."""
import asyncio
import time

from _asgi import SFT
from signalrl.client import AsyncSignalClient
from signalrl.server import auth
from signalrl.server.thread import ServerThread


def test_eight_clients_on_two_runs(service):
    _, key = auth.create_key(service.store, "load")
    with ServerThread(service) as url:
        async def one_client(i, run_id, order):
            async with AsyncSignalClient(base_url=url, api_key=key, retry_deadline=30, result_timeout=120) as c:
                tc = c.get_training_client(run_id)
                futs = []
                for k in range(6):  # pipelined: all queued before any is awaited
                    if k % 2 == 0:
                        futs.append(await tc.forward_backward_async(SFT, "causal_lm"))
                    else:
                        futs.append(await tc.optim_step_async())
                    futs[-1].add_done_callback(lambda f, k=k: order.append(k))
                out = await asyncio.gather(*(asyncio.wrap_future(f.concurrent_future) for f in futs),
                                           return_exceptions=True)
                return tc._session.client_id, out

        async def main():
            async with AsyncSignalClient(base_url=url, api_key=key) as c:
                runs = [(await c.create_run(lora_r=4, learning_rate=1e-2, seed=s))["run_id"] for s in (1, 2)]
            orders = [[] for _ in range(8)]
            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(
                *(one_client(i, runs[i % 2], orders[i]) for i in range(8))), timeout=240)
            return runs, results, orders, time.monotonic() - t0

        runs, results, orders, elapsed = asyncio.run(main())
    assert elapsed < 240
    assert all(o == list(range(6)) for o in orders), orders  # each client's futures resolve in its order
    for run_id in runs:
        for client_id, out in results:
            rows = [service.store.find(run_id, client_id, seq) for seq in range(1, 7)]
            if rows[0] is None:
                continue  # that client was on the other run
            execs = [r["exec_order"] for r in rows]
            assert execs == sorted(execs), execs  # executed in its numbers' order
            assert all(r["status"] in ("done", "failed") for r in rows)
    for _, out in results:  # an optim_step may find no gradients (another client stepped first): a ValueError
        for r in out:
            assert not isinstance(r, BaseException) or isinstance(r, ValueError), r
    steps = {run_id: service.store.run(run_id)["step"] for run_id in runs}  # as the request log recorded it
    assert all(1 <= s <= 12 for s in steps.values()), steps

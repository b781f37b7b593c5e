"""The per-request fast path keeps every guarantee: a submission with ``wait`` carries its result in the same
exchange (and a retry of the number still returns it), the result is in the store before anyone sees it, the
client's next number is accepted in one transaction, the routes served outside FastAPI answer exactly as FastAPI
does, and results survive a new server process on the same root."""
import asyncio
import json

import pytest
from _asgi import SFT, asgi, create_run, engine_process_env, new_key, result, submit
from signalrl.server import Service, Settings


def test_submit_with_wait_returns_the_result_inline_and_retries_return_it_again(service):
    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4, learning_rate=1e-2)
            first = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1, wait=20)
            doc = first.json()
            assert first.status_code == 202 and doc["status"] == "done" and doc["seq"] == 1
            assert doc["result"]["$result"] == "ForwardBackwardResult" and doc["result"]["fields"]["loss"] > 0
            # Committed before the answer left: the log row is final and holds the very result.
            row = service.store.request(doc["request_id"])
            assert row["status"] == "done" and json.loads(service.store.result_of(doc["request_id"])) == doc["result"]
            # Accepted as the client's next number: queued with its execution order, the client's next number
            # moved past it, in the same transaction.
            assert row["exec_order"] is not None and service.store.next_seq(run_id, "c1") == 2
            # The same number again (with or without wait): the original request and its result, run once.
            for wait in (0, 5):
                again = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1, wait=wait)
                assert again.status_code == 200 and again.json() == doc
            assert await result(http, key, doc["request_id"]) == doc
            other = await submit(http, key, run_id, "forward_backward", SFT[:1], "causal_lm", None, seq=1, wait=5)
            assert other.status_code == 409
            step = await submit(http, key, run_id, "optim_step", None, seq=2, wait=20)
            assert step.json()["result"]["fields"]["step"] == 1
            # Two long-polls of one request both get its result; one that gives up early leaves the other waiting.
            slow = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=3)
            rid = slow.json()["request_id"]
            short, full = await asyncio.gather(result(http, key, rid, wait=0.001), result(http, key, rid, wait=20))
            assert full["status"] == "done" and short["status"] in ("pending", "done")
            assert not service._waiters  # nothing left behind

    asyncio.run(main())



@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
def test_results_survive_a_new_server_on_the_same_root(tmp_path, monkeypatch, engine_process):
    """What a restart reads: a result delivered inline, and one that finished but was never fetched. The new server
    finishes recovering before it takes a request: a run created at once does not collide with the recovery."""
    if engine_process:
        engine_process_env(monkeypatch)
    root = str(tmp_path / "root")
    service = Service(root, settings=Settings(max_hold_s=20), engine_process=engine_process)

    async def first():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4, seed=3)
            done = (await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=1, wait=20)).json()
            never = (await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=2)).json()
            for _ in range(400):  # finished on the server, never fetched by anyone
                if service.store.request(never["request_id"])["status"] == "done":
                    break
                await asyncio.sleep(0.05)
            return key, run_id, done, never["request_id"]
    key, run_id, done, never = asyncio.run(first())
    if not engine_process:
        service.runner.close()
    service.store.close()

    again = Service(root, settings=Settings(max_hold_s=20), engine_process=engine_process)

    async def second():
        async with asgi(again) as http:
            other = await create_run(http, key, lora_r=4, seed=4)  # asserts it was created
            assert other != run_id
            assert await result(http, key, done["request_id"]) == done
            got = await result(http, key, never)
            assert got["status"] == "done" and got["result"]["fields"]["loss"] == done["result"]["fields"]["loss"]
            retry = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=1, wait=5)
            assert retry.status_code == 200 and retry.json() == done
    try:
        asyncio.run(second())
    finally:
        if not engine_process:
            again.runner.close()


def test_futures_on_the_callers_loop(engine, tmp_path):
    """The async client's futures resolve through its loop's own futures: a cancelled ``await`` leaves the result
    to the other awaiters, and the ``concurrent.futures`` side (``result()``, other threads) gets the same value."""
    from signalrl.client import AsyncSignalClient, FutureGroup
    from signalrl.server import auth
    from signalrl.server.thread import ServerThread

    service = Service(str(tmp_path / "root"), engine=engine)
    _, key = auth.create_key(service.store, "k")

    async def awaited(fut):
        return await fut

    with ServerThread(service) as url:
        async def main():
            async with AsyncSignalClient(base_url=url, api_key=key, retry_deadline=30, result_timeout=120) as c:
                run = await c.create_run(lora_r=4)
                tc = c.get_training_client(run["run_id"])
                fut = await tc.forward_async(SFT, "causal_lm")
                impatient = asyncio.ensure_future(awaited(fut))
                await asyncio.sleep(0)
                impatient.cancel()
                got = await fut
                assert got.loss > 0 and (await asyncio.to_thread(fut.result, 60)).loss == got.loss
                futs = [await tc.forward_backward_async(SFT, "causal_lm"), await tc.optim_step_async()]
                fb, st = await FutureGroup(futs).wait_all()
                assert fb.loss == got.loss and st.step == 1 and all(f.done() for f in futs)
                assert (await tc.forward(SFT, "causal_lm")).loss != got.loss  # after the step
        asyncio.run(main())


def test_a_clients_next_number_follows_from_its_queued_requests_and_its_skips(tmp_path):
    from signalrl.server.store import Store

    store = Store(str(tmp_path / "signal.db"))

    def add(seq, queued=None, client="c"):
        store.add_request({"request_id": f"r-{client}-{seq}", "run_id": "run", "key_id": "k", "client_id": client,
                           "seq": seq, "op": "forward"}, b"{}", queued=queued)
    assert store.next_seq("run", "c") == 1
    add(1, queued=1)
    add(3)  # waiting for 2: does not move the order
    assert store.next_seq("run", "c") == 2
    store.skip_seqs("run", "c", 4)  # 2 never came: 3 failed, the order moved past both
    assert store.next_seq("run", "c") == 4
    add(4, queued=2)
    assert store.next_seq("run", "c") == 5 and store.next_seq("run", "other") == 1
    add(5)
    store.mark_queued("r-c-5", 3)
    assert store.next_seq("run", "c") == 6 and store.request("r-c-5")["status"] == "queued"

"""The protocol, in-process through httpx's ASGI transport: ids at once, idempotent retries, 409 on a reused
number, results fetched again, out-of-order submission, gaps, bad input (a clear 4xx each, the server healthy),
and user errors that arrive as the local engine's exception with its message."""
import asyncio
import json
import struct
import time

import pytest
import torch

from _asgi import SFT, asgi, bearer, create_run, new_key, result, submit
from signalrl import wire
from signalrl.client.errors import decode_error
from signalrl.server import Settings


async def settled_stats(http, key, run_id):
    """Queue statistics once nothing is pending (the engine counts a request just after its result is stored)."""
    for _ in range(100):
        stats = (await http.get(f"/v1/runs/{run_id}/queue_stats", headers=bearer(key))).json()
        if stats["pending"] == 0:
            return stats
        await asyncio.sleep(0.05)
    return stats


def test_submit_returns_at_once_and_retries_execute_once(service):
    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4, learning_rate=1e-2)
            first = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1)
            assert first.status_code == 202 and first.json()["status"] == "pending"
            rid = first.json()["request_id"]
            again = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1)
            assert again.status_code == 200 and again.json()["request_id"] == rid  # the original future
            step = await submit(http, key, run_id, "optim_step", None, seq=2, wait=20)
            assert step.json()["status"] == "done" and step.json()["result"]["fields"]["step"] == 1
            # The result can be fetched again and again (a response lost on the wire is not lost).
            a, b = await result(http, key, rid), await result(http, key, rid)
            assert a == b and a["status"] == "done"
            # A retry after completion returns the stored result; nothing runs twice.
            late = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1, wait=5)
            assert late.json() == a
            stats = await settled_stats(http, key, run_id)
            assert stats["completed"] == 3 and stats["failed"] == 0  # create_run, forward_backward, optim_step
            assert (await http.get(f"/v1/runs/{run_id}", headers=bearer(key))).json()["step"] == 1
            # The same number with another payload (or another op) is a conflict, and changes nothing.
            other = await submit(http, key, run_id, "forward_backward", SFT[:1], "causal_lm", None, seq=1)
            assert other.status_code == 409 and other.json()["error"]["type"] == "SignalConflictError"
            assert type(decode_error(other.json()["error"], 409)).__name__ == "SignalConflictError"
            other = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=1)
            assert other.status_code == 409
            assert (await settled_stats(http, key, run_id))["completed"] == 3
            # Kept until delivered + result_ttl_s (never-delivered ones: undelivered_ttl_s); then "expired".
            never = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=3)
            await asyncio.sleep(0.5)
            service.flush_delivered()  # (the janitor writes delivery marks within a second)
            now = time.time()
            service.store.expire(delivered_before=now + 1, finished_before=now - 3600)
            assert (await result(http, key, rid))["status"] == "expired"
            kept = await result(http, key, never.json()["request_id"])
            assert kept["status"] == "done"  # not delivered before: kept
            service.store.expire(delivered_before=time.time() + 1, finished_before=time.time() + 1)
            assert (await result(http, key, never.json()["request_id"]))["status"] == "expired"
            retry = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1)
            assert retry.status_code == 200 and retry.json()["status"] == "expired"

    asyncio.run(main())


def test_out_of_order_submission_runs_in_number_order(service):
    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4, learning_rate=1e-2)
            # 3 (optim_step) and 2 arrive before 1: nothing runs until 1 arrives, then 1, 2, 3 in order.
            r3 = await submit(http, key, run_id, "optim_step", None, seq=3)
            r2 = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=2)
            await asyncio.sleep(0.3)
            assert (await result(http, key, r3.json()["request_id"], wait=0))["state"] == "waiting"
            r1 = await submit(http, key, run_id, "forward_backward", SFT, "causal_lm", None, seq=1)
            docs = [await result(http, key, r.json()["request_id"]) for r in (r1, r2, r3)]
            assert [d["status"] for d in docs] == ["done"] * 3
            assert [d["result"]["fields"]["step"] for d in docs] == [0, 0, 1]
            rows = [service.store.request(r.json()["request_id"]) for r in (r1, r2, r3)]
            assert [row["exec_order"] for row in rows] == sorted(row["exec_order"] for row in rows)

    asyncio.run(main())


def test_a_gap_that_never_closes_fails_the_requests_behind_it(engine, tmp_path):
    from signalrl.server import Service

    service = Service(str(tmp_path / "root"), engine=engine, settings=Settings(gap_timeout_s=0.5))

    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4)
            r2 = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=2)
            doc = await result(http, key, r2.json()["request_id"], wait=10)
            assert doc["status"] == "failed" and doc["error"]["type"] == "RequestOrderError"
            assert "[1]" in doc["error"]["message"] and "never reached the server" in doc["error"]["message"]
            late = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=1, wait=5)
            assert late.json()["status"] == "failed" and "arrived after" in late.json()["error"]["message"]
            ok = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=3, wait=20)
            assert ok.json()["status"] == "done"  # the client goes on

    asyncio.run(main())


def _safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_bad_input_gets_a_clear_4xx_and_the_server_stays_healthy(service):
    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4)
            meta = {"signal": json.dumps({"args": [{"input_ids": {"$tensor": "t0"}}, "causal_lm"], "kwargs": {}})}
            cases = [
                (b'{"args": [', wire.JSON, 400, "malformed JSON"),
                (b'{"args": 1}', wire.JSON, 400, "'args' must be a list"),
                (b'[1, 2]', wire.JSON, 400, "expected a JSON object"),
                (b'{"args": [{"$tensor": "t9"}]}', wire.JSON, 400, "names no tensor"),
                (b"op=forward", "application/x-www-form-urlencoded", 415, "content-type"),
                (b"\x80\x03pickle", "application/octet-stream", 415, "content-type"),
                (b"x" * ((1 << 20) + 1), wire.JSON, 413, "max_body_bytes"),
                (_safetensors({"__metadata__": meta, "t0": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 8]}},
                              b"\0" * 8), wire.SAFETENSORS, 400, "does not match"),
                (_safetensors({"__metadata__": meta, "t0": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
                              b"\0" * 8), wire.SAFETENSORS, 400, "invalid tensor data"),
                (_safetensors({"t0": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
                 wire.SAFETENSORS, 400, "no valid Signal document"),
                (struct.pack("<Q", 10 ** 9) + b"{}", wire.SAFETENSORS, 400, "header claims"),
                (b"\x01", wire.SAFETENSORS, 400, "8-byte header"),
                (b"[" * 100_000, wire.JSON, 400, "nested deeper"),
            ]
            seq = 0
            for body, ctype, status, match in cases:
                seq += 1
                r = await submit(http, key, run_id, "forward", body=body, ctype=ctype, seq=seq)
                assert r.status_code == status, (match, r.text)
                err = r.json()["error"]
                assert match in err["message"], (match, err)
                exc = decode_error(err, status)
                assert isinstance(exc, ValueError), exc
                if status == 413:
                    assert type(exc).__name__ == "RequestTooLargeError"
                # The number is used up: a retry gets the same refusal, and later numbers do not wait for it.
                assert (await result(http, key, r.json().get("request_id") or
                                     service.store.find(run_id, "c1", seq)["request_id"], wait=0))["status"] == "failed"
            r = await http.post(f"/v1/runs/{run_id}/requests", params={"op": "forward", "client_id": "c1", "seq": "x"},
                                headers={**bearer(key), "content-type": wire.JSON}, content=b"{}")
            assert r.status_code == 400 and "seq" in r.json()["error"]["message"]
            r = await http.post(f"/v1/runs/{run_id}/requests", params={"op": "forward", "client_id": "a b", "seq": 1},
                                headers={**bearer(key), "content-type": wire.JSON}, content=b"{}")
            assert r.status_code == 400
            r = await submit(http, key, run_id, "no_such_op", SFT, seq=seq + 1)
            assert r.status_code == 400 and "op: expected one of" in r.json()["error"]["message"]
            r = await http.post("/v1/runs", headers={**bearer(key), "content-type": "text/plain"}, content=b"{}")
            assert r.status_code == 415
            r = await http.post("/v1/runs", headers={**bearer(key), "content-type": wire.JSON}, content=b"{nope")
            assert r.status_code == 400
            r = await http.get("/v1/requests/req-x", params={"wait": "soon"}, headers=bearer(key))
            assert r.status_code == 400
            # Healthy: a good request (tensors as safetensors) right after, in order.
            batch = {"input_ids": torch.tensor([[1, 5, 6, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
            r = await submit(http, key, run_id, "forward", batch, "causal_lm", None, seq=seq + 2, wait=20)
            assert r.headers["content-type"] == wire.JSON and r.json()["status"] == "done", r.text
            assert (await http.get("/healthz")).json()["status"] == "ok"

    asyncio.run(main())


@pytest.mark.parametrize("case", ["unknown_loss", "bad_kwarg", "bad_batch", "wrong_dtype", "nan_loss",
                                  "bad_lr", "unknown_run"])
def test_user_errors_arrive_as_the_local_exception(service, engine, case):
    """Same class, same message as the local engine raises for the same request."""
    base = [{"prompt": "ab>", "response": [10, 11, 12], "old_log_probs": [-1.0, -1.0, -1.0], "rewards": 1.0}]
    op, args = {
        "unknown_loss": ("forward_backward", [SFT, "nope", None]),
        "bad_kwarg": ("forward_backward", [SFT, "causal_lm", {"temprature": 1.0}]),
        "bad_batch": ("forward_backward", [[{"nothing": 1}], "causal_lm", None]),
        "wrong_dtype": ("forward", [{"input_ids": torch.ones(1, 3), "attention_mask": torch.ones(1, 3)},
                                    "causal_lm", None]),
        "nan_loss": ("forward_backward", [[dict(base[0], rewards=1e30)], "enhanced_ppo", None]),
        "bad_lr": ("optim_step", [-1.0]),
        "unknown_run": ("forward", [SFT, "causal_lm", None]),
    }[case]

    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4, seed=3)
            local = engine.create_run("signal-tiny", lora_r=4, seed=3).result()["run_id"]
            target = "run-does-not-exist" if case == "unknown_run" else run_id
            r = await submit(http, key, target, op, *args, wait=20)
            with pytest.raises(Exception) as local_exc:
                engine.request("run-does-not-exist" if case == "unknown_run" else local, op, *args).result(60)
            doc = r.json() if case != "unknown_run" else {"status": "failed", "error": r.json()["error"]}
            assert doc["status"] == "failed", doc
            remote_exc = decode_error(doc["error"])
            assert type(remote_exc) is type(local_exc.value)
            msg = str(local_exc.value)
            if case == "unknown_run":  # the local engine lists its runs; the server only the key's own
                assert str(remote_exc) == f"run_id: no run 'run-does-not-exist' in this engine (known runs: {run_id})"
            else:
                assert str(remote_exc) == msg.replace(local, run_id)

    asyncio.run(main())

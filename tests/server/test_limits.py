"""Limits over a real socket: the body cap answers 413 (and the client raises RequestTooLargeError), timeouts are
bounded and configurable, an unreachable server fails in bounded time; ``signal keys`` stores no key."""
import asyncio
import time

import httpx
import pytest

from _asgi import SFT
from signalrl.client import AsyncSignalClient, SignalClient, SignalConnectionError
from signalrl.engine.limits import RequestTooLargeError
from signalrl.server import Service, Settings, auth
from signalrl.server.thread import ServerThread


def test_body_cap_and_result_timeout(engine, tmp_path):
    service = Service(str(tmp_path / "root"), engine=engine, settings=Settings(max_body_bytes=64 << 10))
    _, key = auth.create_key(service.store, "limits")
    with ServerThread(service) as url:
        async def main():
            async with AsyncSignalClient(base_url=url, api_key=key, retry_deadline=10) as c:
                run = await c.create_run(lora_r=4)
                tc = c.get_training_client(run["run_id"])
                huge = [{"text": "x" * 100}] * 2000  # ≈ 250 KB of JSON
                with pytest.raises(RequestTooLargeError, match="max_body_bytes"):
                    await tc.forward(huge, "causal_lm")
                ok = await tc.forward(SFT, "causal_lm")  # the next number does not wait for the refused one
                # A result that takes longer than result_timeout: TimeoutError, bounded; it stays on the server.
                engine.call(run["run_id"], "sleep", lambda r: time.sleep(1.5))
                async with AsyncSignalClient(base_url=url, api_key=key, result_timeout=0.3, poll_hold=0.1) as impatient:
                    t0 = time.monotonic()
                    with pytest.raises(TimeoutError, match="result_timeout"):
                        await impatient.get_training_client(run["run_id"]).forward(SFT, "causal_lm")
                    assert time.monotonic() - t0 < 1.4
                return ok

            assert asyncio.run(main()).loss > 0
            # Raw: a 5 MB body over a real socket gets the 413 answer, not a broken connection.
            r = httpx.post(f"{url}/v1/runs/run-x/requests", headers={"authorization": f"Bearer {key}",
                                                                       "content-type": "application/json"},
                           params={"op": "forward", "client_id": "raw", "seq": 1}, content=b" " * (5 << 20))
            assert r.status_code == 404  # ownership is checked before the body is read
            run_id = service.store.runs()[0]["run_id"]
            r = httpx.post(f"{url}/v1/runs/{run_id}/requests", headers={"authorization": f"Bearer {key}",
                                                                          "content-type": "application/json"},
                           params={"op": "forward", "client_id": "raw", "seq": 1}, content=b" " * (5 << 20))
            assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
            assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_unreachable_server_fails_in_bounded_time():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    t0 = time.monotonic()
    with SignalClient(base_url=f"http://127.0.0.1:{port}", api_key="sk-signal-x", retry_deadline=1.0) as c:
        with pytest.raises(SignalConnectionError, match="retry_deadline"):
            c.create_run(lora_r=4).result(timeout=30)
        with pytest.raises(SignalConnectionError):
            c.list_runs()
    assert time.monotonic() - t0 < 15


def test_keys_cli(tmp_path, capsys):
    from signalrl.cli import main

    root = str(tmp_path / "root")
    assert main(["keys", "create", "--name", "alice", "--root", root]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-signal-")
    assert main(["keys", "list", "--root", root]) == 0
    listing = capsys.readouterr().out
    key_id = auth.key_id_of(key)
    assert key_id in listing and "alice" in listing and "active" in listing and key.split(".")[1] not in listing
    import glob

    for path in glob.glob(f"{root}/signal.db*"):  # the database and its WAL: only a salted hash is stored
        with open(path, "rb") as f:
            assert key.split(".")[1].encode() not in f.read()
    from signalrl.server.store import Store

    assert auth.verify(Store(f"{root}/signal.db"), key) == key_id
    assert main(["keys", "revoke", key_id, "--root", root]) == 0
    assert main(["keys", "revoke", key_id, "--root", root]) == 1
    assert auth.verify(Store(f"{root}/signal.db"), key) is None
    assert main(["keys", "list", "--root", root]) == 0
    assert "revoked" in capsys.readouterr().out

"""The engine process of ``signal serve`` (:mod:`signalrl.server.engine_process`): its frames, its questions, and
what the server does when it dies. (Every protocol, auth and restart test also runs with it: see conftest's
``service`` and test_restart.)"""
import asyncio
import socket
import threading
import time

import pytest
from _asgi import SFT, asgi, bearer, create_run, engine_process_env, new_key, submit
from signalrl.server import Service, Settings
from signalrl.server.engine_process import EngineReplyError, read_frame, send_frame


def test_frames_round_trip():
    a, b = socket.socketpair()
    lock, big = threading.Lock(), bytes(range(256)) * 1024  # 256 KiB: written in two parts
    sent = [({"t": "done", "rid": "r1", "status": "done"}, b'{"x":1}'), ({"cmd": "close"}, b""), ({"t": "x"}, big)]
    writer = threading.Thread(target=lambda: [send_frame(a, lock, h, body) for h, body in sent])
    writer.start()
    f = b.makefile("rb")
    got = [read_frame(f) for _ in sent]
    writer.join(10)
    assert got == sent
    a.sendall(b"\x05\x00\x00\x00\x00\x00\x00\x00{")  # a frame cut short by the end of the stream
    a.close()
    assert read_frame(f) is None


def test_an_engine_object_cannot_go_to_the_engine_process(engine, tmp_path):
    with pytest.raises(ValueError, match="engine"):
        Service(str(tmp_path / "root"), engine=engine, engine_process=True)


def test_serve_refuses_an_engine_process_for_a_sharded_server():
    from signalrl.server.cli import serve

    with pytest.raises(SystemExit) as e:
        serve(["--engine", "process", "--nproc-per-node", "2"])
    assert e.value.code == 2


def test_a_dead_engine_process_makes_the_server_answer_503(tmp_path, monkeypatch):
    engine_process_env(monkeypatch)
    service = Service(str(tmp_path / "root"), settings=Settings(max_hold_s=20), engine_process=True)
    downs = []
    service.on_down = lambda: downs.append(True)

    async def main():
        async with asgi(service) as http:
            key = new_key(service)
            run_id = await create_run(http, key, lora_r=4)
            r = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=1, wait=20)
            assert r.json()["status"] == "done"
            info = (await http.get(f"/v1/runs/{run_id}", headers=bearer(key))).json()
            assert info["status"] == "ready" and info["step"] == 0 and info["config"]["lora_r"] == 4
            stats = (await http.get(f"/v1/runs/{run_id}/queue_stats", headers=bearer(key))).json()
            assert stats["completed"] == 2  # create_run, forward: counted by the engine in the child
            with pytest.raises(EngineReplyError, match="name: expected one of") as e:
                await service.runner.ask("close", run_id)  # what the child raised, as its error document
            assert e.value.doc["type"] == "ValueError"
            service.runner.proc.kill()
            deadline = time.monotonic() + 30
            while service.down is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert service.down is not None and "engine process exited" in service.down and downs == [True]
            health = await http.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "down"
            r = await submit(http, key, run_id, "forward", SFT, "causal_lm", None, seq=2)
            assert r.status_code == 503 and r.json()["error"]["type"] == "SignalServerError"
            r = await http.get(f"/v1/runs/{run_id}", headers=bearer(key))
            assert r.status_code == 503

    asyncio.run(main())

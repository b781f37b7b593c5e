"""Helpers of the server tests: the app in-process through httpx's ASGI transport, and raw protocol calls."""
import contextlib
import json
import uuid

import httpx
import torch

from signalrl import wire
from signalrl.server import auth, create_app

SFT = [{"prompt": "2+2=", "response": "4"}, {"prompt": "hello ", "response": "world"}]


@contextlib.asynccontextmanager
async def asgi(service):
    """An httpx client on the app, in-process (the ASGI transport runs no lifespan: the service is started here)."""
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)),
                                     base_url="http://testserver", timeout=60) as http:
            yield http
    finally:
        await service.stop()


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def new_key(service, name="k"):
    return auth.create_key(service.store, name)[1]


async def create_run(http, key, **config):
    r = await http.post("/v1/runs", params={"wait": 20}, headers={**bearer(key), "content-type": wire.JSON,
                                                                    "idempotency-key": uuid.uuid4().hex},
                        content=json.dumps({"base_model": "signal-tiny", "config": config}))
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["status"] == "done", doc
    return doc["result"]["run_id"]


async def submit(http, key, run_id, op, *args, client_id="c1", seq=1, wait=0, body=None, ctype=None, **kwargs):
    if body is None:
        body, ctype = wire.encode_body({"args": list(args), "kwargs": kwargs})
    return await http.post(f"/v1/runs/{run_id}/requests", params={"op": op, "client_id": client_id, "seq": seq,
                                                                  "wait": wait},
                           headers={**bearer(key), "content-type": ctype}, content=body)


async def result(http, key, request_id, wait=20):
    r = await http.get(f"/v1/requests/{request_id}", params={"wait": wait}, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()


def engine_process_env(monkeypatch):
    """The environment an engine process inherits: a real server's (no Triton interpreter), on this test's backend."""
    from signalrl.ops._backend import native_usable

    monkeypatch.setenv("SIGNAL_BACKEND", "native" if native_usable(torch.device("cpu")) else "reference")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

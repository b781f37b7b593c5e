"""The two transports under one ``TrainingClient``: the in-process engine, and HTTP (:mod:`.http`).

A transport answers every call with a ``concurrent.futures.Future`` (the local one with an already finished one
for the calls the engine answers at once), so the async and the sync clients wrap both the same way. A *session*
is one training client's view of a run: ``submit(op, args, kwargs, wait)`` returns ``(APIFuture, accepted)``,
where ``accepted`` (``None`` locally) finishes when the server has acknowledged the request.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, Callable

from signalrl.engine import Engine

from .futures import APIFuture

ENV_BASE_URL = "SIGNAL_BASE_URL"
ENV_API_KEY = "SIGNAL_API_KEY"


def done_future(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """A finished future holding ``fn()``'s value or exception."""
    f: concurrent.futures.Future = concurrent.futures.Future()
    try:
        f.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - the caller gets it from the future
        f.set_exception(exc)
    return f


class LocalSession:
    def __init__(self, engine: Engine, run_id: str):
        self.engine = engine
        self.run_id = run_id

    def submit(self, op: str, args: tuple, kwargs: dict | None = None, *, wait: bool = False
               ) -> tuple[APIFuture, concurrent.futures.Future | None]:
        return APIFuture(self.engine.request(self.run_id, op, *args, **(kwargs or {})), op), None


class LocalTransport:
    """The embedded engine (``owns``: close it with the client, as a client given an engine always did)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def create_run(self, base_model: str, config: dict[str, Any]) -> concurrent.futures.Future:
        return self.engine.create_run(base_model, **config)

    def session(self, run_id: str) -> LocalSession:
        return LocalSession(self.engine, run_id)

    def list_runs(self) -> concurrent.futures.Future:
        return done_future(self.engine.list_runs)

    def get_run(self, run_id: str) -> concurrent.futures.Future:
        return done_future(lambda: self.engine.get_run(run_id))

    def queue_stats(self, run_id: str) -> concurrent.futures.Future:
        return done_future(lambda: self.engine.queue_stats(run_id))

    def get_metrics(self, run_id: str, since: int = 0) -> concurrent.futures.Future:
        def read() -> list[dict[str, Any]]:
            with open(self.engine.get_run(run_id)["metrics_path"], encoding="utf-8") as f:
                return [json.loads(line) for i, line in enumerate(f) if i >= since and line.strip()]
        return done_future(read)

    def list_checkpoints(self, run_id: str) -> concurrent.futures.Future:
        def names() -> list[str]:
            d = os.path.join(self.engine.get_run(run_id)["run_dir"], "checkpoints")
            return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []
        return done_future(names)

    def close(self) -> None:
        if self.engine is not Engine._default:
            self.engine.close()


def make_transport(engine: Engine | None = None, root_dir: str | None = None, base_url: str | None = None,
                   api_key: str | None = None, *, loop_local: bool = False, **http_options: Any):
    """The local engine (given, in ``root_dir``, or the process-wide default), or HTTP to ``base_url``
    (``$SIGNAL_BASE_URL``; key ``api_key`` or ``$SIGNAL_API_KEY``) when no engine or ``root_dir`` is given.
    ``loop_local``: run HTTP on the caller's event loop (the async client) rather than the transport's thread."""
    if base_url is not None and (engine is not None or root_dir is not None):
        raise ValueError("base_url: a client talks to a server (base_url) or to a local engine (engine / root_dir), "
                         "not both")
    if engine is not None:
        return LocalTransport(engine)
    if root_dir is not None:
        return LocalTransport(Engine(root_dir))
    base_url = base_url or os.environ.get(ENV_BASE_URL) or None
    if base_url is None:
        if http_options or api_key is not None:
            raise ValueError(f"base_url: HTTP options were given but no server (pass base_url= or set ${ENV_BASE_URL})")
        return LocalTransport(Engine.default())
    api_key = api_key or os.environ.get(ENV_API_KEY) or None
    if not api_key:
        raise ValueError(f"api_key: expected the server's API key (api_key= or ${ENV_API_KEY}; create one on the server "
                         "with `signal keys create`), got none")
    from .http import HTTPTransport

    return HTTPTransport(base_url, api_key, loop_local=loop_local, **http_options)


def as_transport(engine_or_transport: Any):
    return LocalTransport(engine_or_transport) if isinstance(engine_or_transport, Engine) else engine_or_transport

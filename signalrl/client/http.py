"""The HTTP transport: the same ``TrainingClient`` against a ``signal serve`` server (httpx).

Where the work runs: for ``AsyncSignalClient`` (``loop_local=True``), a request's steps (posted → long-polled →
result) are tasks and futures of the caller's own event loop; for ``SignalClient``, and whenever no loop is running
in the calling thread, of the transport's own loop thread, so its futures work from any thread. Either way each HTTP
exchange runs on a thread of the transport's connection pool while the loop awaits it (:mod:`.http_pool`). A
training client (a *session*) numbers its requests 1, 2, 3, ...; each request is POSTed with its number
(concurrently: the server puts them back in order), and its result is long-polled. Results are handed out in
request order, as the server executes them. If the loop a session's requests run on is closed before their results
arrive, their futures fail (the server still runs them; its results stay retrievable there).

Every call is safe to retry, so each is retried on a transport error, a 429 or a 5xx (a 500 at most three times)
with exponential back-off until ``retry_deadline``; a 4xx is never retried. Timeouts: ``timeout`` bounds one HTTP
exchange beyond the server's hold, ``poll_hold`` is how long the server may hold one long-poll, and
``result_timeout`` (``None``: no limit) bounds the wait for one result.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import httpx

from signalrl import __version__, wire

from .errors import SignalAPIError, SignalConnectionError, SignalServerError, decode_error
from .http_pool import HTTPPool

if TYPE_CHECKING:
    from .http_session import HTTPSession

FINAL = ("done", "failed", "expired")


def _with_query(path: str, params: dict[str, Any]) -> str:
    """``path?k=v&...`` built once here (httpx's own ``params=`` merging costs more than the request's JSON)."""
    return f"{path}?{urlencode(params)}" if params else path


def _json(r: httpx.Response) -> Any:
    try:
        doc = r.json()
    except ValueError:
        doc = None
    if r.status_code >= 400:
        err = doc.get("error") if isinstance(doc, dict) else None
        if err is None:
            cls = SignalServerError if r.status_code >= 500 else SignalAPIError
            raise cls(f"HTTP {r.status_code} from {r.request.method} {r.request.url.path}: {r.text[:500]}",
                      r.status_code)
        raise decode_error(err, r.status_code)
    return doc


def final_value(doc: dict, op: str) -> Any:
    """The value of a final answer, or raise its error."""
    if doc["status"] == "done":
        return wire.from_wire(doc["result"])
    if doc["status"] == "failed":
        raise decode_error(doc.get("error"))
    raise SignalServerError(f"{op}: the result of request {doc.get('request_id')} expired on the server before "
                            "it was fetched", None, "ResultExpired")


class HTTPTransport:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0, poll_hold: float = 20.0,
                 result_timeout: float | None = 3600.0, retry_deadline: float = 60.0, loop_local: bool = False):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http:// or https:// URL, got {base_url!r}")
        for name, v in (("timeout", timeout), ("poll_hold", poll_hold), ("retry_deadline", retry_deadline),
                        ("result_timeout", result_timeout)):
            if v is None and name == "result_timeout":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}: expected a number of seconds > 0, got {v!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout, self.poll_hold = float(timeout), float(poll_hold)
        self.result_timeout, self.retry_deadline = result_timeout, float(retry_deadline)
        self.engine = None
        self.loop_local = loop_local
        self._closed = False
        self._sessions: "weakref.WeakSet[HTTPSession]" = weakref.WeakSet()
        self._headers = {"authorization": f"Bearer {api_key}", "user-agent": f"signal-rl/{__version__}"}
        self._pool: HTTPPool | None = None  # made at the first request (httpx loads its CA certificates)
        self._pool_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="signal-http", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ plumbing
    def _http(self) -> HTTPPool:
        with self._pool_lock:
            if self._closed:
                raise SignalAPIError("this client is closed")
            if self._pool is None:
                self._pool = HTTPPool(self.base_url, self._headers,
                                      httpx.Timeout(self.timeout + self.poll_hold, connect=min(10.0, self.timeout)),
                                      httpx.Limits(max_connections=256, max_keepalive_connections=64))
            return self._pool

    def caller_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop to run on: the calling thread's running loop for a loop-local transport, else None."""
        if not self.loop_local:
            return None
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def _call(self, coro) -> concurrent.futures.Future:
        if self._closed:
            coro.close()
            raise SignalAPIError("this client is closed")
        loop = self.caller_loop()
        if loop is None:
            return asyncio.run_coroutine_threadsafe(coro, self._loop)
        out: concurrent.futures.Future = concurrent.futures.Future()
        task = loop.create_task(coro)

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                out.set_exception(SignalAPIError("the event loop was closed before this call finished"))
            elif t.exception() is not None:
                out.set_exception(t.exception())
            else:
                out.set_result(t.result())
        task.add_done_callback(done)
        return out

    async def _send(self, method: str, path: str, content: bytes | None = None,
                    headers: dict[str, str] | None = None) -> httpx.Response:
        """``path``: with its query. Retried as the module says."""
        deadline = time.monotonic() + self.retry_deadline
        delay, faults = 0.05, 0
        pool = self._http()
        request = pool.request(method, path, content, headers)  # built once, sent again on a retry
        while True:
            try:
                r = await pool.send(request)
            except httpx.TransportError as exc:  # connect/read/write errors, timeouts: every call is idempotent
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code < 500 and r.status_code != 429:
                    return r
                faults += 1
                if r.status_code == 500 and faults >= 3:
                    return r  # a server bug: waiting will not fix it
                problem = f"HTTP {r.status_code}"
            if time.monotonic() + delay > deadline:
                raise SignalConnectionError(f"{method} {self.base_url}{path}: {problem}; gave up after retrying for "
                                            f"{self.retry_deadline:g} s (retry_deadline)")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _get(self, path: str, **params: Any) -> Any:
        return _json(await self._send("GET", _with_query(path, params)))

    async def _outcome(self, doc: dict, op: str) -> Any:
        """Long-poll until the request is final; its value, or raise its error."""
        start = time.monotonic()
        while doc.get("status") not in FINAL:
            rid = doc["request_id"]
            hold = self.poll_hold
            if self.result_timeout is not None:
                left = self.result_timeout - (time.monotonic() - start)
                if left <= 0:
                    raise TimeoutError(f"{op}: no result within result_timeout={self.result_timeout:g} s (request "
                                       f"{rid} is {doc.get('state', doc.get('status'))} on the server; it stays "
                                       "retrievable there)")
                hold = max(0.0, min(hold, left))
            doc = await self._get(f"/v1/requests/{quote(rid, safe='')}", wait=round(hold, 3))
        return final_value(doc, op)

    # ------------------------------------------------------------------ the transport interface
    def create_run(self, base_model: str, config: dict[str, Any]) -> concurrent.futures.Future:
        try:
            body = json.dumps(wire.to_wire({"base_model": base_model, "config": config})).encode()
        except TypeError as exc:
            f: concurrent.futures.Future = concurrent.futures.Future()
            f.set_exception(exc)
            return f
        headers = {"content-type": wire.JSON, "idempotency-key": uuid.uuid4().hex}

        async def go() -> dict:
            doc = _json(await self._send("POST", _with_query("/v1/runs", {"wait": self.poll_hold}), body, headers))
            return await self._outcome(doc, "create_run")
        return self._call(go())

    def session(self, run_id: str) -> "HTTPSession":
        from .http_session import HTTPSession

        s = HTTPSession(self, run_id)
        self._sessions.add(s)
        return s

    def _run_path(self, run_id: str, tail: str = "") -> str:
        return f"/v1/runs/{quote(str(run_id), safe='')}{tail}"

    def list_runs(self) -> concurrent.futures.Future:
        async def go():
            return (await self._get("/v1/runs"))["runs"]
        return self._call(go())

    def get_run(self, run_id: str) -> concurrent.futures.Future:
        return self._call(self._get(self._run_path(run_id)))

    def queue_stats(self, run_id: str) -> concurrent.futures.Future:
        return self._call(self._get(self._run_path(run_id, "/queue_stats")))

    def get_metrics(self, run_id: str, since: int = 0) -> concurrent.futures.Future:
        async def go():
            return (await self._get(self._run_path(run_id, "/metrics"), since=since))["records"]
        return self._call(go())

    def list_checkpoints(self, run_id: str) -> concurrent.futures.Future:
        async def go():
            return (await self._get(self._run_path(run_id, "/checkpoints")))["checkpoints"]
        return self._call(go())

    def close(self) -> None:
        """Stop the transport; results not yet received fail with :class:`SignalAPIError` (the server still runs
        the requests, and keeps their results)."""
        if self._closed:
            return
        self._closed = True

        for s in list(self._sessions):
            s._fail_pending(SignalAPIError("the client was closed before this request's result arrived"))

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        """``close()``, after cancelling the tasks of this client's requests on the running loop (the async
        client's ``close``)."""
        loop = asyncio.get_running_loop()
        if not self._closed:
            for s in list(self._sessions):
                s._cancel_tasks_on(loop)
        self.close()

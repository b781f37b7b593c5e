"""The HTTP connection pool of a transport (httpx): whole, prebuilt requests, each exchanged on a pool thread.

**Prebuilt requests.** Each request is one ``httpx.Request`` (absolute URL, headers, body, timeouts) handed to
httpx's transport (``HTTPTransport.handle_request``), and its answer is read in full. ``Client.request`` does the
same after per-request work this protocol never uses — merging the URL with a base URL (parsed twice), the cookie
jar, the auth and redirect flows, event hooks.

**Threads.** The exchange itself runs on a thread of a small pool while the caller's event loop awaits it: httpx's
synchronous stack (httpcore on plain sockets) costs about 40% less CPU per exchange than its asynchronous one
(httpcore over anyio: cancel scopes, locks and socket-attribute lookups around every read and write), more than the
hand-off to a thread and back costs (docs/server.md, "Overhead"). The threads are daemons, started on demand up
to the connection limit, so an exchange still in flight never holds up the interpreter's exit; one whose caller
went away (a cancelled task, a closed loop) finishes on its own within its timeouts, its answer dropped.

Proxies named by the environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) are httpx's to
apply: with any of them set, the prebuilt requests go through an ``httpx.Client`` (``client.send``), which picks
the proxy as it always did.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import urllib.request
from typing import Any, Callable

import httpx

from .errors import SignalAPIError


def _environment_proxies() -> bool:
    """Whether ``httpx.Client`` (``trust_env``) would mount a proxy from the environment."""
    found = urllib.request.getproxies()
    return any(found.get(scheme) for scheme in ("http", "https", "all"))


class DaemonThreads:
    """At most ``limit`` daemon threads, started when no idle one can take the work. ``run(fn, arg)`` on a running
    event loop: ``fn(arg)`` on a thread, its value (or exception) back in an ``asyncio`` future of that loop."""

    def __init__(self, limit: int, name: str):
        self._limit, self._name = limit, name
        self._work: "queue.SimpleQueue[tuple | None]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0  # idle: threads done with their work and not yet promised another
        self._closed = False

    def run(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("closed")
            self._work.put((fn, arg, loop, done))
            if self._idle:
                self._idle -= 1
            elif self._threads < self._limit:
                self._threads += 1
                threading.Thread(target=self._run, name=f"{self._name}-{self._threads}", daemon=True).start()
        return done

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, arg, loop, done = item
            del item
            value = exc = None
            if not done.cancelled():  # (read from this thread: at worst a cancelled exchange still runs)
                try:
                    value = fn(arg)
                except BaseException as e:  # noqa: BLE001 - the caller's future gets it
                    exc = e
            with self._lock:  # idle before the caller is told: it may hand this thread its next exchange
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_deliver, done, value, exc)
            except RuntimeError:  # the caller's loop is closed: nobody is waiting
                pass
            del fn, arg, loop, done, value, exc

    def shutdown(self) -> None:
        """Idle threads end; busy ones end after their exchange."""
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._work.put(None)


def _deliver(done: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if not done.done():
        if exc is None:
            done.set_result(value)
        else:
            done.set_exception(exc)


class HTTPPool:
    def __init__(self, base_url: str, headers: dict[str, str], timeout: httpx.Timeout, limits: httpx.Limits):
        self.base_url = base_url
        self._headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._extensions = {"timeout": timeout.as_dict()}
        if _environment_proxies():
            self._client: httpx.Client | None = httpx.Client(timeout=timeout, limits=limits)
            self._transport: httpx.BaseTransport | None = None
        else:
            self._client, self._transport = None, httpx.HTTPTransport(limits=limits)
        self._threads = DaemonThreads(limits.max_connections or 256, "signal-http")

    def request(self, method: str, target: str, content: bytes | None = None,
                headers: dict[str, str] | None = None) -> httpx.Request:
        """``target``: the path and query, as sent."""
        raw = self._headers
        if headers:
            raw = raw + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        return httpx.Request(method, self.base_url + target, headers=raw, content=content,
                             extensions=self._extensions)

    def _exchange(self, request: httpx.Request) -> httpx.Response:
        if self._client is not None:
            return self._client.send(request)
        response = self._transport.handle_request(request)
        response.request = request
        try:
            response.read()
        finally:
            response.close()
        return response

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The answer, read in full (its connection is back in the pool)."""
        try:
            exchange = self._threads.run(self._exchange, request)
        except RuntimeError:  # closed
            raise SignalAPIError("this client is closed") from None
        return await exchange

    def close(self) -> None:
        self._threads.shutdown()
        (self._client if self._client is not None else self._transport).close()

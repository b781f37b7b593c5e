"""One training client over HTTP: numbers its requests, posts them (concurrently: the server puts them back in
order), and resolves their futures in order by long-polling each result (:mod:`signalrl.client.http`).

When the requests run on the caller's own loop (the async client), the futures between the steps of a request
(posted → long-polled → result) are that loop's ``asyncio`` futures: each ``concurrent.futures`` hand-off would
wake the loop through its self-pipe, a few tens of microseconds each, several times a request. The caller still
gets a ``concurrent.futures.Future`` inside its :class:`APIFuture` (set at the same moment), so ``result()`` and
other threads work as before."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import uuid
from typing import TYPE_CHECKING
from urllib.parse import quote

from signalrl import wire

from .errors import SignalAPIError
from .futures import APIFuture
from .http import FINAL, _json, final_value

if TYPE_CHECKING:
    from .http import HTTPTransport


class _Item:
    __slots__ = ("op", "seq", "body", "ctype", "wait", "result", "accepted", "on_loop")

    def __init__(self, op, seq, body, ctype, wait, result, accepted, on_loop):
        self.op, self.seq, self.body, self.ctype, self.wait = op, seq, body, ctype, wait
        self.result, self.accepted, self.on_loop = result, accepted, on_loop  # on_loop: the result, asyncio


def _settle(f, value=None, exc: BaseException | None = None) -> None:
    """Finish ``f`` (a concurrent or an asyncio future, from any thread) unless it is done."""
    if f is None or f.done():
        return
    if isinstance(f, asyncio.Future):
        loop = f.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, f, value, exc)
            return
    if exc is not None:
        f.set_exception(exc)
    else:
        f.set_result(value)



def _hand_out(item: _Item, doc: dict) -> None:
    try:
        value = final_value(doc, item.op)
    except BaseException as exc:  # noqa: BLE001 - the request's future gets it
        _settle(item.result, exc=exc)
        _settle(item.on_loop, exc=exc)
    else:
        _settle(item.result, value)
        _settle(item.on_loop, value)


class HTTPSession:
    """One training client: numbers its requests, posts them, and resolves their futures in order."""

    def __init__(self, transport: HTTPTransport, run_id: str):
        self.t = transport
        self.run_id = run_id
        self.client_id = uuid.uuid4().hex
        self._requests = transport._run_path(run_id, "/requests")
        self._seq = 0
        self._lock = threading.Lock()
        self._queue: collections.deque[_Item] = collections.deque()
        self._pump: asyncio.Task | None = None
        self._home: asyncio.AbstractEventLoop | None = None  # the loop this session's requests run on
        self._tasks: set[asyncio.Task] = set()

    def submit(self, op: str, args: tuple, kwargs: dict | None = None, *, wait: bool = False):
        """``(APIFuture, accepted)``; ``accepted`` is an ``asyncio`` future when the requests run on the caller's loop
        (``asyncio.wrap_future`` returns it as it is), else a ``concurrent.futures.Future``."""
        result: concurrent.futures.Future = concurrent.futures.Future()
        try:
            body, ctype = wire.encode_body({"args": list(args), "kwargs": dict(kwargs or {})})
        except (TypeError, ValueError) as exc:  # nothing was numbered or sent
            accepted: concurrent.futures.Future = concurrent.futures.Future()
            result.set_exception(exc)
            accepted.set_exception(exc)
            return APIFuture(result, op), accepted
        caller = self.t.caller_loop()
        with self._lock:
            if self.t._closed:
                raise SignalAPIError("this client is closed")
            if self._home is None or self._home.is_closed():
                if self._queue:  # their loop is gone (it cancelled them as it closed)
                    self._fail_pending(SignalAPIError("the event loop these requests ran on was closed before their "
                                                      "results arrived (the server still ran them)"))
                self._queue, self._pump = collections.deque(), None
                self._home = caller or self.t._loop
            self._seq += 1
            if self._home is caller:
                item = _Item(op, self._seq, body, ctype, wait, result, caller.create_future(), caller.create_future())
                self._start(item)
            else:
                item = _Item(op, self._seq, body, ctype, wait, result, concurrent.futures.Future(), None)
                self._home.call_soon_threadsafe(self._start, item)
        return APIFuture(result, op, item.on_loop), item.accepted

    def _start(self, item: _Item) -> None:
        loop = asyncio.get_running_loop()  # the home loop: _start runs on it
        self._queue.append(item)
        self._spawn(loop, self._post(item))
        if self._pump is None:
            self._pump = self._spawn(loop, self._run_pump())

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro) -> asyncio.Task:
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel_tasks_on(self, loop: asyncio.AbstractEventLoop) -> None:
        for task in list(self._tasks):
            if task.get_loop() is loop:
                task.cancel()

    async def _post(self, item: _Item) -> None:
        # (the query by hand: only op needs quoting; client_id is hex, seq an int, wait a float)
        target = (f"{self._requests}?op={quote(item.op, safe='')}&client_id={self.client_id}&seq={item.seq}"
                  f"&wait={self.t.poll_hold if item.wait else 0}")
        try:
            doc = _json(await self.t._send("POST", target, content=item.body, headers={"content-type": item.ctype}))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the request's future gets it
            _settle(item.accepted, exc=exc)
        else:
            _settle(item.accepted, doc)
            if item.on_loop is not None and doc.get("status") in FINAL and self._queue and self._queue[0] is item:
                _hand_out(item, doc)  # the answer carries the result and nothing is ahead of it: no hop to the pump
        item.body = None

    async def _run_pump(self) -> None:
        while self._queue:
            item = self._queue[0]
            try:
                doc = await asyncio.wrap_future(item.accepted)
                if item.result.done():  # handed out by its submission (_post)
                    self._queue.popleft()
                    continue
                value = await self.t._outcome(doc, item.op)
            except asyncio.CancelledError:  # the loop is closing (or the client): nobody will resolve these
                self._fail_pending(SignalAPIError("the event loop these requests ran on was closed (or the client) "
                                                  "before their results arrived (the server still ran them)"))
                self._pump = None
                raise
            except BaseException as exc:  # noqa: BLE001
                _settle(item.result, exc=exc)
                _settle(item.on_loop, exc=exc)
            else:
                _settle(item.result, value)
                _settle(item.on_loop, value)
            self._queue.popleft()
        self._pump = None

    def _fail_pending(self, exc: BaseException) -> None:
        for item in list(self._queue):
            for f in (item.accepted, item.result, item.on_loop):
                _settle(f, exc=exc)

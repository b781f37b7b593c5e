"""One worker thread per device: requests execute one at a time, FIFO within each run, round-robin across runs.

Submitting returns a ``concurrent.futures.Future`` at once; the caller's thread (or event loop) is never
blocked by model work. Each run (each ``key``) has its own queue and keeps submission order. The worker takes
one request from each run that has work, in turn, so a run with a hundred queued requests delays another
run's next request by at most one request, never by the whole backlog.

A cancelled future (``Future.cancel()`` while it is queued) is skipped; ``on_cancel`` is told, so queue
statistics stay consistent.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable


class DeviceWorker:
    def __init__(self, device: str):
        self.device = device
        self._queues: "collections.OrderedDict[Hashable, collections.deque]" = collections.OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[[], Any], key: Hashable = None,
               on_cancel: Callable[[], None] | None = None) -> Future:
        """Queue ``fn`` behind ``key``'s earlier requests; its result or exception goes to the returned future."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"signal-worker-{self.device}", daemon=True)
                self._thread.start()
            self._queues.setdefault(key, collections.deque()).append((fn, fut, on_cancel))
            self._cond.notify()
        return fut

    def _next(self) -> tuple | None:
        """The head of the first run's queue; that run then goes to the back of the rotation."""
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if not self._queues:
                return None
            key, q = next(iter(self._queues.items()))
            item = q.popleft()
            del self._queues[key]
            if q:
                self._queues[key] = q  # re-inserted at the end: round-robin
            return item

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            fn, fut, on_cancel = item
            if not fut.set_running_or_notify_cancel():
                if on_cancel is not None:
                    on_cancel()
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller's future
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def close(self, wait: bool = True) -> None:
        """Stop after the queued requests have run (``wait`` blocks until then)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if wait and thread is not None:
            thread.join()

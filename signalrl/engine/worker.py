"""One worker thread per device: requests execute one at a time, in submission order.

Submitting returns a ``concurrent.futures.Future`` at once; the caller's thread (or event loop) is never
blocked by model work. FIFO order over the whole device implies FIFO order for every run on it.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class DeviceWorker:
    def __init__(self, device: str):
        self.device = device
        self._queue: "queue.SimpleQueue[tuple | None]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Queue ``fn``; its result or exception goes to the returned future."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"signal-worker-{self.device}", daemon=True)
                self._thread.start()
            self._queue.put((fn, fut))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller's future
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def close(self, wait: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if wait and thread is not None:
            thread.join()

"""Futures of the training API.

``APIFuture`` wraps the engine's ``concurrent.futures.Future``. In async code ``await fut`` gives the
result without blocking the event loop; in sync code ``fut.result()`` blocks. A request's error
(unknown run, unknown loss, bad batch, bad kwargs, ...) is raised by ``await fut`` / ``fut.result()``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Generic, Iterable, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """The pending result of one queued request.

    ``loop_future``: an ``asyncio`` future on the loop that produces the result (a remote client's requests on
    the caller's loop), set together with ``future``; awaiting on that loop waits on it directly instead of through
    ``asyncio.wrap_future``, whose thread-safe hand-off costs a wake-up of the loop through its self-pipe."""

    def __init__(self, future: concurrent.futures.Future, op: str = "request",
                 loop_future: asyncio.Future | None = None):
        self._future = future
        self.op = op
        self._loop_future = loop_future

    def _awaitable(self) -> asyncio.Future:
        lf = self._loop_future
        if lf is not None:
            try:
                same = lf.get_loop() is asyncio.get_running_loop()
            except RuntimeError:
                same = False
            if same:  # shielded: a cancelled awaiter must not cancel the result for the others
                return lf if lf.done() else asyncio.shield(lf)
        return asyncio.wrap_future(self._future)

    def __await__(self):
        return self._awaitable().__await__()

    def result(self, timeout: float | None = None) -> T:
        """Block until done (do not call this on a running event loop's thread; ``await`` instead)."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    @property
    def concurrent_future(self) -> concurrent.futures.Future:
        return self._future

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {self.op} {state}>"


class FutureGroup:
    """A set of :class:`APIFuture` waited on together.

    ``await group.wait_all()`` → results in the order the futures were added (the first error is
    raised unless ``return_exceptions=True``); ``await group.wait_any()`` → ``(index, result)`` of the
    first to finish. ``results()`` / ``first()`` are the blocking forms for synchronous code.
    """

    def __init__(self, futures: Iterable[APIFuture] = ()):
        self.futures: list[APIFuture] = list(futures)

    def add(self, fut: APIFuture) -> APIFuture:
        self.futures.append(fut)
        return fut

    def __len__(self) -> int:
        return len(self.futures)

    def __iter__(self):
        return iter(self.futures)

    async def wait_all(self, return_exceptions: bool = False) -> list[Any]:
        return list(await asyncio.gather(*(f._awaitable() for f in self.futures),
                                         return_exceptions=return_exceptions))

    async def wait_any(self) -> tuple[int, Any]:
        if not self.futures:
            raise ValueError("wait_any: the group is empty")
        wrapped = [f._awaitable() for f in self.futures]
        done, _ = await asyncio.wait(wrapped, return_when=asyncio.FIRST_COMPLETED)
        index = min(wrapped.index(d) for d in done)
        return index, wrapped[index].result()

    def results(self, timeout: float | None = None) -> list[Any]:
        return [f.result(timeout) for f in self.futures]

    def first(self, timeout: float | None = None) -> tuple[int, Any]:
        if not self.futures:
            raise ValueError("first: the group is empty")
        cfs = [f._future for f in self.futures]
        done, _ = concurrent.futures.wait(cfs, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        if not done:
            raise TimeoutError("no future finished in time")
        index = min(cfs.index(d) for d in done)
        return index, cfs[index].result()

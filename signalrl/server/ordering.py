"""Request order per training client: numbers 1, 2, 3, ... are handed out in order, whatever order they arrive in.

A request whose predecessor has not arrived waits; when the gap closes, the run of ready requests is handed to
``dispatch`` in number order. A gap still open after ``gap_timeout_s`` fails the requests waiting behind it (they
must not run out of order), and a number that arrives after that fails too. A request refused at the door
(``rejected``) uses up its number without running.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from signalrl import wire

from .store import Store


@dataclass
class Pending:
    request_id: str
    seq: int
    op: str
    args: list | None  # decoded from ``body`` where the engine runs it, when None
    kwargs: dict | None
    arrived: float
    rejected: bool = False
    body: bytes | None = None  # the request's payload as accepted (``wire.decode_request``), and its content type
    ctype: str | None = None
    exec_order: int | None = None  # set once it is queued (at acceptance when it was its client's next number)
    recorded: bool = False         # its outcome is in the store (set on the worker, before the future finishes)


class _Client:
    __slots__ = ("next_seq", "waiting", "touched")

    def __init__(self, next_seq: int):
        self.next_seq, self.waiting, self.touched = next_seq, {}, time.monotonic()


class Sequencer:
    def __init__(self, store: Store, gap_timeout_s: float, dispatch: Callable[[str, str, Pending, int], None],
                 fail: Callable[[str, dict], None]):
        self.store, self.gap_timeout_s = store, gap_timeout_s
        self.dispatch = dispatch  # dispatch(run_id, client_id, pending, next_seq)
        self.fail = fail          # fail(request_id, error document)
        self._clients: dict[tuple[str, str], _Client] = {}

    def _client(self, run_id: str, client_id: str) -> _Client:
        key = (run_id, client_id)
        if key not in self._clients:
            self._clients[key] = _Client(self.store.next_seq(run_id, client_id))
        st = self._clients[key]
        st.touched = time.monotonic()
        return st

    def is_next(self, run_id: str, client_id: str, seq: int) -> bool:
        """Whether ``seq`` is the number its client's order waits for (it can be queued as it is accepted)."""
        return self._client(run_id, client_id).next_seq == seq

    def add(self, run_id: str, client_id: str, p: Pending) -> None:
        st = self._client(run_id, client_id)
        if p.seq < st.next_seq:  # its successors were already failed by close_gaps
            if not p.rejected:
                self.fail(p.request_id, wire.error_doc(
                    "RequestOrderError", f"request {p.seq} of training client {client_id} arrived after "
                    f"gap_timeout_s={self.gap_timeout_s:g} s, when the requests after it had already failed"))
            return
        st.waiting[p.seq] = p
        while st.next_seq in st.waiting:
            q = st.waiting.pop(st.next_seq)
            st.next_seq += 1
            if q.rejected:
                self.store.skip_seqs(run_id, client_id, st.next_seq)
            else:
                self.dispatch(run_id, client_id, q, st.next_seq)

    def close_gaps(self) -> None:
        now = time.monotonic()
        for (run_id, client_id), st in list(self._clients.items()):
            if not st.waiting:
                if now - st.touched > 600:
                    del self._clients[(run_id, client_id)]
                continue
            if now - min(p.arrived for p in st.waiting.values()) < self.gap_timeout_s:
                continue
            top = max(st.waiting)
            missing = [s for s in range(st.next_seq, top) if s not in st.waiting]
            for seq in sorted(st.waiting):
                p = st.waiting.pop(seq)
                if not p.rejected:
                    self.fail(p.request_id, wire.error_doc(
                        "RequestOrderError", f"request {seq} of training client {client_id} was not run: request(s) "
                        f"{missing} of that client never reached the server within gap_timeout_s="
                        f"{self.gap_timeout_s:g} s, and requests run in their numbers' order"))
            st.next_seq = top + 1
            self.store.skip_seqs(run_id, client_id, st.next_seq)

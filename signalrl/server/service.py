"""The server's core, below HTTP: ownership, the ordered request log, long-polls; the engine's side (running
requests, recording outcomes, checkpoints, recovery) is a :class:`~.runner.Runner`, here or in the engine process.

Ordering (:mod:`.ordering`): each training client (``client_id``) numbers its requests 1, 2, 3, ...; the server
hands them to the run's engine FIFO in that order, whatever order they arrive in. A number seen again returns the
first request (same payload) or is a conflict (another payload: 409, decided in ``app``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from signalrl import wire
from signalrl.engine import Engine, RunNotFoundError
from signalrl.engine.config import _CHECKS

from .ordering import Pending, Sequencer
from .recovery import recover_waiting
from .runner import Runner, finish
from .store import FINAL, Store

log = logging.getLogger("signalrl.server")
TRAINING_OPS = ("forward_backward", "forward", "optim_step", "sample", "score", "compute_logprobs", "save_state",
                "load_state", "export_model")


@dataclass
class Settings:
    """Limits of a server (``signal serve --help`` names the same ones)."""
    max_body_bytes: int = 64 << 20       # larger request bodies are answered 413
    max_hold_s: float = 30.0             # the longest a long-poll is held before "pending" is answered
    result_ttl_s: float = 3600.0         # a result is kept this long after its first delivery ...
    undelivered_ttl_s: float = 7 * 86400.0  # ... and this long if it is never fetched
    gap_timeout_s: float = 60.0          # how long a request waits for a missing predecessor
    checkpoint_every: int = 10           # automatic checkpoints of runs that do not choose (optimizer steps)
    keep_checkpoints: int = 2            # automatic checkpoints kept per run


class ApiError(Exception):
    """An answer other than 2xx: HTTP ``status`` and an error document."""

    def __init__(self, status: int, error: BaseException | dict):
        super().__init__(str(error))
        self.status = status
        self.doc = error if isinstance(error, dict) else wire.encode_error(error)


def payload_hash(op: str, ctype: str, body: bytes) -> str:
    return hashlib.sha256(op.encode() + b"\0" + ctype.encode() + b"\0" + body).hexdigest()


def _time_up(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Service:
    """The server below HTTP. ``engine_process=True`` (``signal serve``'s default) runs the engine in a child process
    (:mod:`.engine_process`); otherwise a :class:`~.runner.Runner` runs it here, on ``engine`` if given (tests share
    one) or a new one in ``<root>/runs``."""

    def __init__(self, root: str, *, engine: Engine | None = None, settings: Settings | None = None,
                 engine_process: bool = False):
        if engine_process and engine is not None:
            raise ValueError("engine: an engine object cannot be moved into the engine process; pass one or the other")
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.settings = settings or Settings()
        self.store = Store(os.path.join(self.root, "signal.db"))
        self.runs_dir = os.path.join(self.root, "runs") if engine is None else engine.root_dir
        self.engine_process = engine_process
        self.runner: Any = None  # a Runner, or (once started) an engine_process.EngineProcess with its methods
        if not engine_process:
            self.runner = Runner(self.root, self.store, self.settings, self.notify, engine=engine)
        self.down: str | None = None  # why the engine process is gone (the server then answers 503)
        self.on_down: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}  # request id -> its long-polls (see wait)
        self._ready: dict[str, str] = {}  # run id -> owner, of runs seen ready (a ready run stays ready)
        self.sequencer = Sequencer(self.store, self.settings.gap_timeout_s, self._dispatch,
                                   lambda rid, doc: self.record(rid, error=doc))
        self._exec: dict[str, int] = {}
        self._owner: dict[str, str] = {}
        self._delivered: set[str] = set()
        self._janitor: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the engine process (if any), recover what the store holds, start the housekeeping."""
        if self._loop is not None:
            return
        self._loop, self.down = asyncio.get_running_loop(), None
        if self.engine_process:
            from .engine_process import EngineProcess  # (the child runs that module: the package does not import it)

            try:
                self.runner = EngineProcess(self.root, self.settings, self._wake, self._engine_exited)
                await self.runner.started()
                await self.runner.ask("recover")  # the engine's half of a restart, before any new request
            except Exception as exc:
                self.down = f"the server's engine process did not start: {exc}"
                if self.runner is not None:
                    await asyncio.to_thread(self.runner.close, 5)
                    self.runner.detach()
                    self.runner = None
                self._loop = None
                raise
        else:
            self.runner.recover()
        recover_waiting(self)
        self._janitor = asyncio.create_task(self._janitor_loop())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        if self.engine_process and self.runner is not None:
            await asyncio.to_thread(self.runner.close)
            self.runner.detach()
            self.runner = None
        self._loop = None

    def _engine_exited(self, code: int) -> None:
        self.down = f"the server's engine process exited (code {code}); the server must be restarted"
        if self.on_down is not None:
            self.on_down()

    # ------------------------------------------------------------------ runs
    def run_row(self, key_id: str, run_id: str):
        row = self.store.run(run_id)
        if row is None or row["key_id"] != key_id or row["status"] != "ready":
            own = ", ".join(r["run_id"] for r in self.store.runs(key_id) if r["status"] == "ready") or "none"
            raise ApiError(404, RunNotFoundError(f"run_id: no run {run_id!r} in this engine (known runs: {own})"))
        return row

    def check_up(self) -> None:
        if self.down is not None:
            raise ApiError(503, wire.error_doc("SignalServerError", self.down))

    def check_run(self, key_id: str, run_id: str) -> None:
        """:meth:`run_row`'s check, without reading the store for a run already seen ready for this key."""
        self.check_up()
        if self._ready.get(run_id) != key_id:
            self.run_row(key_id, run_id)
            self._ready[run_id] = key_id

    async def ask(self, name: str, run_id: str) -> dict[str, Any]:
        """``run_info`` or ``queue_stats`` of a run, from wherever the engine is. What it raises there is a 500 (with
        its error document) in either place; an engine process that is gone or silent, a 503."""
        if self.engine_process:
            from .engine_process import EngineProcessError, EngineReplyError

            self.check_up()
            try:
                return await self.runner.ask(name, run_id, timeout=60.0)
            except EngineReplyError as exc:
                raise ApiError(500, exc.doc) from None
            except (EngineProcessError, asyncio.TimeoutError) as exc:
                raise ApiError(503, wire.error_doc("SignalServerError", str(exc) or "the engine did not answer"))
        try:
            return getattr(self.runner, name)(run_id)
        except Exception as exc:  # noqa: BLE001 - as the engine process answers it
            raise ApiError(500, exc) from None

    async def list_runs(self, key_id: str) -> list[dict[str, Any]]:
        rows = [r for r in self.store.runs(key_id) if r["status"] == "ready"]
        return list(await asyncio.gather(*(self.ask("run_info", r["run_id"]) for r in rows)))

    def create_run(self, key_id: str, idem: str, doc: Any, digest: str) -> dict[str, Any]:
        if not isinstance(doc, dict) or set(doc) - {"base_model", "config"} or not isinstance(
                doc.get("config", {}), dict):
            raise ApiError(400, wire.WireError('body: expected {"base_model": ..., "config": {...}}'))
        self.check_up()
        old = self.store.find_create(key_id, idem)
        if old is not None:
            if old["payload_hash"] != digest:
                raise ApiError(409, wire.error_doc("SignalConflictError", f"idempotency-key {idem!r} was already used "
                                                   "for another create_run"))
            return {"request_id": old["request_id"], "run_id": old["run_id"], "duplicate": True}
        config = dict(doc.get("config") or {})
        every = config.pop("checkpoint_every", None)
        run_id, rid = f"run-{uuid.uuid4().hex[:12]}", f"req-{uuid.uuid4().hex}"
        stored = {"base_model": doc.get("base_model", "signal-tiny"), **config,
                  "checkpoint_every": self.settings.checkpoint_every if every is None else every}
        self.store.add_run(run_id, key_id, stored, {"request_id": rid, "client_id": idem, "payload_hash": digest})
        try:
            _CHECKS["checkpoint_every"]("checkpoint_every", every)
        except (TypeError, ValueError) as exc:
            self.store.set_run_status(run_id, "failed")
            self.record(rid, error=exc)
        else:
            self.runner.open(run_id, key_id, stored, create_request=rid)
        return {"request_id": rid, "run_id": run_id, "duplicate": False}

    # ------------------------------------------------------------------ requests: submission and order
    def new_request(self, key_id: str, run_id: str, client_id: str, seq: int, op: str, body: bytes, ctype: str
                    ) -> dict[str, Any]:
        """Accept a request body (``wire.WireError`` if it is malformed: the caller rejects it); its head (the
        request's row as :meth:`wait` reads it). The client's next number (the usual case) is stored already
        ``queued`` (one statement, one commit) and handed to the engine at once."""
        if op not in TRAINING_OPS:
            raise wire.WireError(f"op: expected one of {TRAINING_OPS}, got {op!r}")
        args, kwargs = wire.decode_request(body, ctype)
        row = {"request_id": f"req-{uuid.uuid4().hex}", "run_id": run_id, "key_id": key_id, "client_id": client_id,
               "seq": seq, "op": op, "payload_hash": payload_hash(op, ctype, body), "content_type": ctype}
        p = Pending(row["request_id"], seq, op, args, kwargs, time.monotonic(), body=body, ctype=ctype)
        if self.sequencer.is_next(run_id, client_id, seq):
            exec_order = self._last_exec(run_id) + 1
            self.store.add_request(row, payload=body, queued=exec_order)  # IntegrityError: nothing changed
            self._exec[run_id] = p.exec_order = exec_order
        else:
            self.store.add_request(row, payload=body)
        self.sequencer.add(run_id, client_id, p)
        return {**row, "status": "waiting" if p.exec_order is None else "queued", "expired_at": None}

    def reject(self, key_id: str, run_id: str, client_id: str, seq: int, op: str, error: BaseException) -> str:
        """Record a request refused at the door: its number is used up (failed, with ``error``), so the client's
        later requests do not wait for it."""
        rid = f"req-{uuid.uuid4().hex}"
        try:
            self.store.add_request({"request_id": rid, "run_id": run_id, "key_id": key_id, "client_id": client_id,
                                    "seq": seq, "op": op, "error": json.dumps(wire.encode_error(error))}, None)
        except sqlite3.IntegrityError:  # a concurrent retry of the same number got there first
            return self.store.find(run_id, client_id, seq)["request_id"]
        self.sequencer.add(run_id, client_id, Pending(rid, seq, op, [], {}, time.monotonic(), rejected=True))
        return rid

    def _last_exec(self, run_id: str) -> int:
        return self._exec.get(run_id) or self.store.max_exec(run_id)

    def _dispatch(self, run_id: str, client_id: str, p: Pending, next_seq: int) -> None:
        """Give ``p`` the run's next execution number (unless it got one as it was accepted) and hand it to the
        engine."""
        if p.exec_order is None:
            p.exec_order = self._exec[run_id] = self._last_exec(run_id) + 1
            self.store.mark_queued(p.request_id, p.exec_order)
        if run_id not in self._owner:
            self._owner[run_id] = self.store.run(run_id)["key_id"]
        self.runner.run(run_id, self._owner[run_id], p, p.exec_order)

    def record(self, rid: str, **outcome: Any) -> None:
        """Store a request's outcome (:func:`.runner.finish`) and hand it to its long-polls."""
        self.notify(rid, *finish(self.store, rid, **outcome))

    def notify(self, rid: str, status: str, outcome: bytes) -> None:
        """An outcome, committed to the store, from any thread (the engine process's outcomes go to :meth:`_wake`
        directly, on the loop): its long-polls answer from it without reading the store again."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake, rid, status, outcome)
            except RuntimeError:
                pass

    def _wake(self, rid: str, status: str, outcome: bytes) -> None:
        for w in self._waiters.pop(rid, ()):
            if not w.done():
                w.set_result((status, outcome))

    # ------------------------------------------------------------------ results
    async def wait(self, key_id: str, rid: str, hold: float, head: dict | None = None) -> bytes:
        """The request's state as a JSON document, after holding up to ``hold`` seconds for it to finish.
        ``head``: the row of a request this call has just accepted (:meth:`new_request`), so nothing is read.

        No outcome can slip between reading the state and holding: :meth:`record` commits before it schedules
        :meth:`_wake` on this loop, and nothing awaits between the read and the registration of the waiter."""
        row = head if head is not None else self.store.request(rid)
        if row is None or row["key_id"] != key_id:
            raise ApiError(404, LookupError(f"request_id: no request {rid!r} for this API key"))
        hold = max(0.0, min(float(hold), self.settings.max_hold_s))
        if row["status"] not in FINAL and hold > 0:
            loop = asyncio.get_running_loop()
            mine = loop.create_future()
            self._waiters.setdefault(rid, []).append(mine)
            timer = loop.call_later(hold, _time_up, mine)
            try:
                outcome = await mine
            finally:
                timer.cancel()
                others = self._waiters.get(rid)
                if others is not None and mine in others:
                    others.remove(mine)
                    if not others:
                        del self._waiters[rid]
            if outcome is not None:
                self._delivered.add(rid)
                return self._final(row, *outcome)
            row = self.store.request(rid)
        return self.answer(row)

    @staticmethod
    def _final(row, status: str, outcome: bytes) -> bytes:
        head = json.dumps({"request_id": row["request_id"], "run_id": row["run_id"], "op": row["op"], "seq": row["seq"],
                           "status": status})
        return head[:-1].encode() + (b',"result":' if status == "done" else b',"error":') + outcome + b"}"

    def answer(self, row) -> bytes:
        if row["status"] not in FINAL:
            return json.dumps({"request_id": row["request_id"], "run_id": row["run_id"], "op": row["op"],
                               "seq": row["seq"], "status": "pending", "state": row["status"]}).encode()
        if row["expired_at"] is not None:
            return json.dumps({"request_id": row["request_id"], "run_id": row["run_id"], "op": row["op"],
                               "seq": row["seq"], "status": "expired"}).encode()
        if row["delivered_at"] is None:  # written by the janitor within a second (a lost mark keeps a result longer)
            self._delivered.add(row["request_id"])
        if row["status"] == "failed":
            return self._final(row, "failed", row["error"].encode())
        return self._final(row, "done", self.store.result_of(row["request_id"]))

    # ------------------------------------------------------------------ housekeeping
    def flush_delivered(self) -> None:
        if self._delivered:
            delivered, self._delivered = self._delivered, set()
            self.store.mark_delivered(delivered)

    async def _janitor_loop(self) -> None:
        last_expiry = 0.0
        while True:
            await asyncio.sleep(min(1.0, self.settings.gap_timeout_s / 4))
            try:
                self.flush_delivered()
                self.sequencer.close_gaps()
                now = time.time()
                if now - last_expiry > 30:
                    last_expiry = now
                    self.store.expire(now - self.settings.result_ttl_s, now - self.settings.undelivered_ttl_s)
            except Exception:  # noqa: BLE001 - housekeeping must never stop
                log.exception("server housekeeping failed")

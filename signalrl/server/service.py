"""The server's core, below HTTP: ownership, the ordered request log, execution through the engine, long-polls.

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
from typing import Any

from signalrl import wire
from signalrl.engine import Engine, RunNotFoundError
from signalrl.engine.config import _CHECKS

from . import execution
from .ordering import Pending, Sequencer
from .paths import PathPolicy
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
    def __init__(self, root: str, *, engine: Engine | None = None, settings: Settings | None = None):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.settings = settings or Settings()
        self.store = Store(os.path.join(self.root, "signal.db"))
        self.engine = engine if engine is not None else Engine(os.path.join(self.root, "runs"))
        self.paths = PathPolicy(os.path.join(self.root, "files"), self.engine.root_dir, self.owns)
        self.reopen_errors: dict[str, BaseException] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}  # request id -> its long-polls (see wait)
        self._ready: dict[str, str] = {}  # run id -> owner, of runs seen ready (a ready run stays ready)
        self.sequencer = Sequencer(self.store, self.settings.gap_timeout_s, self._dispatch,
                                   lambda rid, doc: self.record(rid, error=doc))
        self._exec: dict[str, int] = {}
        self._owner: dict[str, str] = {}
        self._delivered: set[str] = set()
        self._every: dict[str, int] = {}
        self._janitor: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        from .recovery import recover

        recover(self)
        self._janitor = asyncio.create_task(self._janitor_loop())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        self._loop = None

    # ------------------------------------------------------------------ runs
    def owns(self, key_id: str, run_id: str) -> bool:
        row = self.store.run(run_id)
        return row is not None and row["key_id"] == key_id and row["status"] != "failed"

    def run_row(self, key_id: str, run_id: str):
        row = self.store.run(run_id)
        if row is None or row["key_id"] != key_id or row["status"] != "ready":
            own = ", ".join(r["run_id"] for r in self.store.runs(key_id) if r["status"] == "ready") or "none"
            raise ApiError(404, RunNotFoundError(f"run_id: no run {run_id!r} in this engine (known runs: {own})"))
        return row

    def check_run(self, key_id: str, run_id: str) -> None:
        """:meth:`run_row`'s check, without reading the store for a run already seen ready for this key."""
        if self._ready.get(run_id) != key_id:
            self.run_row(key_id, run_id)
            self._ready[run_id] = key_id

    def checkpoint_every(self, run_id: str) -> int:
        if run_id not in self._every:
            row = self.store.run(run_id)
            self._every[run_id] = int(json.loads(row["config"]).get("checkpoint_every") or 0) if row else 0
        return self._every[run_id]

    def run_info(self, row) -> dict[str, Any]:
        cfg = json.loads(row["config"])
        try:
            info = self.engine.get_run(row["run_id"])
            info["status"] = "ready"
        except RunNotFoundError:  # being reopened after a restart
            info = {"run_id": row["run_id"], "name": cfg.get("name"), "base_model": cfg.get("base_model"),
                    "lora_r": cfg.get("lora_r"), "step": row["step"], "status": "restoring",
                    "created_at": row["created_at"], "config": dict(cfg)}
        info["config"] = {**info["config"], "checkpoint_every": cfg.get("checkpoint_every")}
        if row["run_id"] in self.reopen_errors:
            info["status"], info["error"] = "broken", str(self.reopen_errors[row["run_id"]])
        return info

    def list_runs(self, key_id: str) -> list[dict[str, Any]]:
        return [self.run_info(r) for r in self.store.runs(key_id) if r["status"] == "ready"]

    def create_run(self, key_id: str, idem: str, doc: Any, digest: str) -> dict[str, Any]:
        if not isinstance(doc, dict) or set(doc) - {"base_model", "config"} or not isinstance(
                doc.get("config", {}), dict):
            raise ApiError(400, wire.WireError('body: expected {"base_model": ..., "config": {...}}'))
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
            self.open(run_id, key_id, stored, create_request=rid)
        return {"request_id": rid, "run_id": run_id, "duplicate": False}

    def open(self, run_id: str, key_id: str, stored: dict, create_request: str | None = None) -> None:
        """Create (``create_request``) or reopen a run in the engine, as ``stored`` describes it."""
        cfg = {k: v for k, v in stored.items() if k not in ("base_model", "checkpoint_every")}

        def opened(f) -> None:
            exc = f.exception()
            if create_request is None:
                if exc is not None:
                    self.reopen_errors[run_id] = exc
                    log.error("run %s could not be reopened: %s", run_id, exc)
                return
            self.store.set_run_status(run_id, "failed" if exc is not None else "ready")
            if exc is not None:
                self.record(create_request, error=exc)
            else:
                self.record(create_request, result=self.run_info(self.store.run(run_id)))
        try:
            base = self.paths.model(key_id, stored.get("base_model"), "base_model")
            fut = self.engine.open_run(run_id, base, **cfg)
        except Exception as exc:  # noqa: BLE001 - the path policy's error, or a closed engine
            from concurrent.futures import Future
            fut = Future()
            fut.set_exception(exc)
        fut.add_done_callback(opened)

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
        p = Pending(row["request_id"], seq, op, args, kwargs, time.monotonic())
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
        self.run_on_engine(run_id, self._owner[run_id], p, p.exec_order)

    def run_on_engine(self, run_id: str, key_id: str, p: Pending, exec_order: int) -> None:
        fn, after = execution.executor(self, run_id, key_id, p, exec_order)
        try:
            fut = self.engine.call(run_id, p.op, fn, after)
        except Exception as exc:  # noqa: BLE001 - a closed engine
            self.record(p.request_id, error=exc)
            return
        fut.add_done_callback(lambda f: self._settled(run_id, p, f))

    def explain(self, run_id: str, exc: BaseException) -> BaseException | dict:
        """A run that is not in the engine because it could not be reopened: say so, not "no such run"."""
        if isinstance(exc, RunNotFoundError) and run_id in self.reopen_errors:
            return wire.error_doc("RunRestoreError", f"run {run_id}: the server could not reopen it after a "
                                  f"restart: {self.reopen_errors[run_id]}")
        return exc

    def _settled(self, run_id: str, p: Pending, f) -> None:
        """The last word on every request: one whose outcome was not recorded (a cancelled request, a failure of the
        bookkeeping itself) gets an error recorded here."""
        if p.recorded:  # the usual case, known without reading the store
            return
        row = self.store.request(p.request_id)
        if row is None or row["status"] in FINAL:
            return
        exc = f.exception() if not f.cancelled() else RuntimeError("the request was cancelled on the server")
        self.record(p.request_id, error=self.explain(run_id, exc or RuntimeError("no result")))

    def record(self, rid: str, *, result: Any = None, error: BaseException | dict | None = None,
               keep_payload: bool = False, run_step: tuple[str, int] | None = None) -> None:
        """Store a request's outcome (on whichever thread it happened; committed before anyone can see it) and hand
        it to its long-polls, which answer from it without reading the store again."""
        data = None
        if error is None:
            try:
                data = wire.dumps(result)
            except TypeError as exc:
                error = wire.error_doc("ServerEncodingError", f"the result could not be encoded: {exc}")
        err = None if error is None else json.dumps(error if isinstance(error, dict) else wire.encode_error(error))
        self.store.finish(rid, result=data, error=err, keep_payload=keep_payload and err is None, run_step=run_step)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake, rid, "done" if err is None else "failed",
                                          data if err is None else err.encode())
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

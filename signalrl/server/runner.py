"""The engine side of a server: the engine, and what must happen beside it — runs opened and reopened, requests run
with their outcome recorded, automatic checkpoints, and the engine's half of a restart.

A :class:`Runner` lives where the engine lives: in the server's process (``signal serve --engine thread``, the
sharded server, tests that share an engine) or in the engine process (:mod:`.engine_process`, the default of
``signal serve``). Either way it writes every outcome to the store *before* anyone hears of it, then calls
``notify(request_id, status, outcome)``, where ``status`` is ``"done"`` or ``"failed"`` and ``outcome`` the result's
or the error's JSON bytes, as they will be delivered.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future
from typing import Any, Callable

from signalrl import wire
from signalrl.engine import Engine, RunNotFoundError

from . import execution
from .ordering import Pending
from .paths import PathPolicy
from .recovery import recover_runs
from .store import FINAL, Store

log = logging.getLogger("signalrl.server")
Notify = Callable[[str, str, bytes], None]


def finish(store: Store, rid: str, *, result: Any = None, error: BaseException | dict | None = None,
           keep_payload: bool = False, run_step: tuple[str, int] | None = None) -> tuple[str, bytes]:
    """Commit a request's outcome; ``(status, outcome bytes)`` as :meth:`Service.wait` delivers them."""
    data = None
    if error is None:
        try:
            data = wire.dumps(result)
        except TypeError as exc:
            error = wire.error_doc("ServerEncodingError", f"the result could not be encoded: {exc}")
    err = None if error is None else json.dumps(error if isinstance(error, dict) else wire.encode_error(error))
    store.finish(rid, result=data, error=err, keep_payload=keep_payload and err is None, run_step=run_step)
    return ("done", data) if err is None else ("failed", err.encode())


def restoring_info(row) -> dict[str, Any]:
    """What is known of a run that is not (yet) in the engine: its stored configuration."""
    cfg = json.loads(row["config"])
    return {"run_id": row["run_id"], "name": cfg.get("name"), "base_model": cfg.get("base_model"),
            "lora_r": cfg.get("lora_r"), "step": row["step"], "status": "restoring", "created_at": row["created_at"],
            "config": dict(cfg)}


class Runner:
    def __init__(self, root: str, store: Store, settings, notify: Notify, *, engine: Engine | None = None):
        self.store, self.settings, self.notify = store, settings, notify
        self.engine = engine if engine is not None else Engine(os.path.join(root, "runs"))
        self.paths = PathPolicy(os.path.join(root, "files"), self.engine.root_dir, self.owns)
        self.reopen_errors: dict[str, BaseException] = {}
        self._every: dict[str, int] = {}

    def owns(self, key_id: str, run_id: str) -> bool:
        row = self.store.run(run_id)
        return row is not None and row["key_id"] == key_id and row["status"] != "failed"

    def checkpoint_every(self, run_id: str) -> int:
        if run_id not in self._every:
            row = self.store.run(run_id)
            self._every[run_id] = int(json.loads(row["config"]).get("checkpoint_every") or 0) if row else 0
        return self._every[run_id]

    def record(self, rid: str, **outcome: Any) -> None:
        """:func:`finish`, then ``notify`` (on whichever thread the outcome happened)."""
        self.notify(rid, *finish(self.store, rid, **outcome))

    def explain(self, run_id: str, exc: BaseException) -> BaseException | dict:
        """A run that is not in the engine because it could not be reopened: say so, not "no such run"."""
        if isinstance(exc, RunNotFoundError) and run_id in self.reopen_errors:
            return wire.error_doc("RunRestoreError", f"run {run_id}: the server could not reopen it after a "
                                  f"restart: {self.reopen_errors[run_id]}")
        return exc

    # ------------------------------------------------------------------ what the server asks
    def run_info(self, run_id: str) -> dict[str, Any]:
        row = self.store.run(run_id)
        if row is None:
            raise RunNotFoundError(f"run_id: no run {run_id!r}")
        cfg = json.loads(row["config"])
        try:
            info = self.engine.get_run(run_id)
            info["status"] = "ready"
        except RunNotFoundError:  # being reopened after a restart
            info = restoring_info(row)
        info["config"] = {**info["config"], "checkpoint_every": cfg.get("checkpoint_every")}
        if run_id in self.reopen_errors:
            info["status"], info["error"] = "broken", str(self.reopen_errors[run_id])
        return info

    def queue_stats(self, run_id: str) -> dict[str, Any]:
        try:
            return self.engine.queue_stats(run_id)
        except LookupError:  # still being restored after a restart
            return {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "pending": 0, "running": None,
                    "mean_queue_wait_s": 0.0, "mean_exec_s": 0.0, "restoring": True}

    # ------------------------------------------------------------------ what the server hands over
    def open(self, run_id: str, key_id: str, stored: dict, create_request: str | None = None) -> None:
        """Create (``create_request``: its outcome is the run's description) or reopen a run, as ``stored``
        (its row's configuration) describes it."""
        cfg = {k: v for k, v in stored.items() if k not in ("base_model", "checkpoint_every")}

        def opened(f: Future) -> None:
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
                self.record(create_request, result=self.run_info(run_id))
        try:
            base = self.paths.model(key_id, stored.get("base_model"), "base_model")
            fut = self.engine.open_run(run_id, base, **cfg)
        except Exception as exc:  # noqa: BLE001 - the path policy's error, or a closed engine
            fut = Future()
            fut.set_exception(exc)
        fut.add_done_callback(opened)

    def run(self, run_id: str, key_id: str, p: Pending, exec_order: int) -> None:
        """Queue request ``p`` in its run's FIFO; its outcome is recorded on the worker, before the run's next
        request starts."""
        fn, after = execution.executor(self, run_id, key_id, p, exec_order)
        try:
            fut = self.engine.call(run_id, p.op, fn, after)
        except Exception as exc:  # noqa: BLE001 - a closed engine
            self.record(p.request_id, error=exc)
            return
        fut.add_done_callback(lambda f: self._settled(run_id, p, f))

    def _settled(self, run_id: str, p: Pending, f: Future) -> None:
        """The last word on every request: one whose outcome was not recorded (a cancelled request, a failure of the
        bookkeeping itself) gets an error recorded here."""
        if p.recorded:  # the usual case, known without reading the store
            return
        row = self.store.request(p.request_id)
        if row is None or row["status"] in FINAL:
            return
        exc = f.exception() if not f.cancelled() else RuntimeError("the request was cancelled on the server")
        self.record(p.request_id, error=self.explain(run_id, exc or RuntimeError("no result")))

    def recover(self) -> None:
        """The engine's half of a restart (:func:`.recovery.recover_runs`)."""
        recover_runs(self)

    def close(self) -> None:
        self.engine.close()

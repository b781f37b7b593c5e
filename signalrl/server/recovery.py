"""A restart: every run of the store is reopened, restored and continued; nothing accepted is silently lost.

The engine's half (:func:`recover_runs`, run by the :class:`~.runner.Runner` wherever the engine lives), for each
run, in its engine FIFO: reopen it from its stored configuration, restore it
(:func:`signalrl.server.execution.restorer`: newest loadable automatic checkpoint, then a replay of the log after
it), then run the requests that were accepted but had not finished (``queued``, in their execution order; one
that was running when the process died runs again from the restored state). A run whose creation had not finished
is created again. A run that cannot be reopened (its base model directory is gone, ...) is listed as ``broken`` and
its pending requests fail with the reason.

The server's half (:func:`recover_waiting`, once the engine's half has queued its work — the engine process answers
the server's ``recover`` ask only then — and before the server takes a request): requests still ``waiting`` for a
predecessor wait again (and fail after the gap timeout if it never comes). Results done before the restart are in the
store, retrievable as before.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Callable

from signalrl import wire

from .execution import restorer
from .ordering import Pending

if TYPE_CHECKING:
    from .runner import Runner
    from .service import Service
    from .store import Store

log = logging.getLogger("signalrl.server")


def _pending(store: "Store", row, record: Callable[..., None]) -> Pending | None:
    """The request of ``row``, its payload checked (a request that cannot be decoded fails with the reason)."""
    payload, ctype = store.payload(row["request_id"])
    try:
        if payload is None:
            raise wire.WireError("its payload is missing from the request log")
        args, kwargs = wire.decode_request(payload, ctype)
    except ValueError as exc:
        record(row["request_id"], error=wire.error_doc(
            "RequestLostError", f"request {row['request_id']} could not be run after a restart: {exc}"))
        return None
    return Pending(row["request_id"], row["seq"], row["op"], args, kwargs, time.monotonic(), body=payload, ctype=ctype)


def recover_runs(runner: "Runner") -> None:
    store = runner.store
    for run in store.runs():
        run_id, key_id, stored = run["run_id"], run["key_id"], json.loads(run["config"])
        if run["status"] == "creating":
            creates = [r for r in store.in_state(run_id, "queued") if r["op"] == "create_run"]
            log.info("run %s: creating it again (the server stopped while it was being created)", run_id)
            runner.open(run_id, key_id, stored, create_request=creates[0]["request_id"] if creates else None)
            if not creates:
                store.set_run_status(run_id, "ready")
            continue
        if run["status"] != "ready":
            continue
        runner.open(run_id, key_id, stored)
        runner.engine.call(run_id, "restore", restorer(runner, run_id, key_id))
        for row in store.in_state(run_id, "queued"):
            p = _pending(store, row, runner.record)
            if p is not None:
                runner.run(run_id, key_id, p, row["exec_order"])


def recover_waiting(service: "Service") -> None:
    for run in service.store.runs():
        if run["status"] != "ready":
            continue
        for row in service.store.in_state(run["run_id"], "waiting"):
            p = _pending(service.store, row, service.record)
            if p is not None:
                service.sequencer.add(run["run_id"], row["client_id"], p)

"""A restart: every run of the store is reopened, restored and continued; nothing accepted is silently lost.

For each run, in its engine FIFO: reopen it from its stored configuration, restore it
(:func:`signalrl.server.execution.restorer`: newest loadable automatic checkpoint, then a replay of the log after
it), then run the requests that were accepted but had not finished (``queued``, in their execution order; one
that was running when the process died runs again from the restored state). A run whose creation had not finished
is created again. Requests still ``waiting`` for a predecessor wait again (and fail after the gap timeout if it
never comes). A run that cannot be reopened (its base model directory is gone, ...) is listed as ``broken`` and
its pending requests fail with the reason. Results done before the restart are in the store, retrievable as before.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from signalrl import wire

from .execution import restorer

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("signalrl.server")


def _pending(service: "Service", row):
    from .ordering import Pending

    payload, ctype = service.store.payload(row["request_id"])
    try:
        if payload is None:
            raise wire.WireError("its payload is missing from the request log")
        args, kwargs = wire.decode_request(payload, ctype)
    except ValueError as exc:
        service.record(row["request_id"], error=wire.error_doc(
            "RequestLostError", f"request {row['request_id']} could not be run after a restart: {exc}"))
        return None
    return Pending(row["request_id"], row["seq"], row["op"], args, kwargs, time.monotonic())


def recover(service: "Service") -> None:
    for run in service.store.runs():
        run_id, key_id, stored = run["run_id"], run["key_id"], json.loads(run["config"])
        if run["status"] == "creating":
            creates = [r for r in service.store.in_state(run_id, "queued") if r["op"] == "create_run"]
            log.info("run %s: creating it again (the server stopped while it was being created)", run_id)
            service.open(run_id, key_id, stored, create_request=creates[0]["request_id"] if creates else None)
            if not creates:
                service.store.set_run_status(run_id, "ready")
            continue
        if run["status"] != "ready":
            continue
        service.open(run_id, key_id, stored)
        service.engine.call(run_id, "restore", restorer(service, run_id, key_id))
        for row in service.store.in_state(run_id, "queued"):
            p = _pending(service, row)
            if p is not None:
                service.run_on_engine(run_id, key_id, p, row["exec_order"])
        for row in service.store.in_state(run_id, "waiting"):
            p = _pending(service, row)
            if p is not None:
                service.sequencer.add(run_id, row["client_id"], p)

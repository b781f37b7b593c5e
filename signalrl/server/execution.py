"""What runs on the engine's worker thread for the server (through :class:`.runner.Runner`): a request with its
bookkeeping, the automatic checkpoints, and a run's restore after a restart.

**Execution.** A request runs through :meth:`Engine.call` in its run's FIFO, and its result (or error) is written
to the store *on the worker thread, before the run's next request starts*. So the request log never lags behind
the run: whatever the moment the process dies, every request the log says is done has happened, in log order.

**Automatic checkpoints.** After an ``optim_step`` that makes the step a multiple of the run's ``checkpoint_every``,
the run is saved as ``auto-<exec order, 12 digits>``, *after* that step's result was recorded; the newest
``keep_checkpoints`` of them are kept. The name says which prefix of the log the checkpoint holds.

**Restore** (:func:`restorer`): load the newest ``auto-*`` checkpoint that loads, then replay, in execution order,
every request done after it that changes the run (``forward_backward``, ``optim_step``, ``sample``, ``save_state``,
``load_state``, a ``forward`` that created a head), with the metrics log muted. The engine is deterministic for a
run (its own RNG stream, seeded sampling generator), so the run is exactly where it was when the process died.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable

from signalrl import wire

if TYPE_CHECKING:
    from .ordering import Pending
    from .runner import Runner

log = logging.getLogger("signalrl.server")
REPLAY_OPS = ("forward_backward", "forward", "optim_step", "sample", "save_state", "load_state")
_AUTO = re.compile(r"^auto-(\d{12})$")


class _Muted:
    """A metrics writer that writes nothing (replays and automatic checkpoints are not the user's records)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def muted(run):
    saved = run.metrics
    run.metrics = _Muted(saved.path)
    try:
        yield
    finally:
        run.metrics = saved


def auto_checkpoints(run_dir: str) -> list[tuple[str, int]]:
    """``(name, exec order)`` of the run's automatic checkpoints, newest first."""
    d = os.path.join(run_dir, "checkpoints")
    names = os.listdir(d) if os.path.isdir(d) else []
    found = [(n, int(m.group(1))) for n in names if (m := _AUTO.match(n)) and os.path.isdir(os.path.join(d, n))]
    return sorted(found, key=lambda x: -x[1])


def executor(runner: "Runner", run_id: str, key_id: str, p: "Pending", exec_order: int
             ) -> tuple[Callable[[Any], Any], Callable[[Any, bool], None]]:
    """``(fn, after)`` for :meth:`Engine.call`: ``fn`` runs the request; ``after`` (once the engine has counted it
    and filled in ``timing``) records its outcome and takes a due automatic checkpoint."""
    seen: dict[str, Any] = {}

    def fn(run) -> Any:
        seen["run"], seen["heads"] = run, len(run.heads)
        args, kwargs = (p.args, p.kwargs) if p.args is not None else wire.decode_request(p.body, p.ctype)
        args, kwargs = runner.paths.request(key_id, p.op, args, kwargs)
        return getattr(run, p.op)(*args, **kwargs)

    def after(value: Any, ok: bool) -> None:
        if not ok:
            runner.record(p.request_id, error=runner.explain(run_id, value))
            p.recorded = True
            return
        run = seen["run"]
        replay = p.op in REPLAY_OPS and (p.op != "forward" or len(run.heads) != seen["heads"])
        step = (run_id, run.step) if p.op in ("optim_step", "load_state") else None
        runner.record(p.request_id, result=value, keep_payload=replay, run_step=step)
        p.recorded = True
        if p.op == "optim_step":
            _maybe_checkpoint(runner, run, run_id, exec_order)
    return fn, after


def _maybe_checkpoint(runner: "Runner", run, run_id: str, exec_order: int) -> None:
    every = runner.checkpoint_every(run_id)
    if not every or run.step % every:
        return
    name = f"auto-{exec_order:012d}"
    try:
        with muted(run):
            run.save_state(name)
    except Exception as exc:  # noqa: BLE001 - the previous checkpoint and the log still cover the run
        log.warning("run %s: automatic checkpoint %s failed: %s", run_id, name, exc)
        return
    found = auto_checkpoints(run.run_dir)
    kept = found[:runner.settings.keep_checkpoints]
    for old, _ in found[len(kept):]:
        path = os.path.join(run.run_dir, "checkpoints", old)
        if os.path.islink(path):  # the version directory is removed by the next save's clean-up
            os.unlink(path)
    runner.store.set_checkpoint(run_id, name, exec_order, keep_from=kept[-1][1])


def restorer(runner: "Runner", run_id: str, key_id: str) -> Callable[[Any], dict]:
    def restore(run) -> dict:
        after, used, replayed, failed = 0, None, 0, 0
        with muted(run):
            for name, exec_order in auto_checkpoints(run.run_dir):
                try:
                    run.load_state(name)
                except Exception as exc:  # noqa: BLE001 - try the one before
                    log.warning("run %s: checkpoint %s does not load (%s); trying an older one", run_id, name, exc)
                    continue
                after, used = exec_order, name
                break
            for row in runner.store.replayable(run_id, after, REPLAY_OPS):
                payload, ctype = runner.store.payload(row["request_id"])
                if payload is None:
                    continue
                try:
                    args, kwargs = wire.decode_request(payload, ctype)
                    args, kwargs = runner.paths.request(key_id, row["op"], args, kwargs)
                    getattr(run, row["op"])(*args, **kwargs)
                    replayed += 1
                except Exception as exc:  # noqa: BLE001
                    failed += 1
                    log.error("run %s: replaying request %s (%s) failed: %s", run_id, row["request_id"], row["op"], exc)
        log.info("run %s restored: checkpoint %s, %d requests replayed%s", run_id, used or "(none)", replayed,
                 f", {failed} FAILED" if failed else "")
        return {"checkpoint": used, "replayed": replayed, "replay_failures": failed, "step": run.step}
    return restore

"""The local engine: owns runs, one worker per device, and the shared reference-model cache.

Every request returns a ``concurrent.futures.Future`` as soon as it is queued. Requests are validated
and executed on the device's worker thread in submission order, so errors (unknown run, unknown loss,
bad batch, bad kwargs) surface from the future, and a failed request never stops later ones.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import fields
from typing import Any, Callable

import torch

from . import limits
from .models import load_base_model
from .frozen_models import ReferenceCache
from .run import Run, RunConfig
from .worker import DeviceWorker


class RunNotFoundError(LookupError):
    """No run with this id exists in this engine."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else "run not found"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_root_dir() -> str:
    return os.environ.get("SIGNAL_HOME", os.path.join(os.getcwd(), "runs"))


class _Stats:
    __slots__ = ("submitted", "completed", "failed", "cancelled", "wait_s", "exec_s", "running")

    def __init__(self) -> None:
        self.submitted = self.completed = self.failed = self.cancelled = 0
        self.wait_s = self.exec_s = 0.0
        self.running: str | None = None


def load_or_close(run: Run, checkpoint: str | None) -> None:
    """Open a new run on ``checkpoint`` (if given): a failed load closes the run and raises."""
    if checkpoint is None:
        return
    try:
        run.load_state(checkpoint)
    except BaseException:
        run.close()
        raise


class Engine:
    """``Engine(root_dir=None, reference_cache_size=2, max_request_bytes=None)``. ``root_dir`` holds one
    directory per run (``metrics.jsonl``, ``checkpoints/``); default ``$SIGNAL_HOME`` or ``./runs``.
    ``max_request_bytes``: the per-request memory limit (:mod:`signalrl.engine.limits`); default
    ``$SIGNAL_MAX_REQUEST_BYTES`` or half of this device's memory."""

    _default: "Engine | None" = None
    _default_lock = threading.Lock()

    def __init__(self, root_dir: str | None = None, *, reference_cache_size: int = 2,
                 max_request_bytes: int | None = None):
        self.root_dir = os.path.abspath(root_dir or default_root_dir())
        self.max_request_bytes = limits.resolve_max_request_bytes(max_request_bytes)
        self.reference_cache = ReferenceCache(lambda name, **kw: load_base_model(name, arg="reference_model", **kw)[0],
                                              capacity=reference_cache_size)
        self._runs: dict[str, Run] = {}
        self._pending_ids: set[str] = set()
        self._stats: dict[str, _Stats] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._session = uuid.uuid4().hex[:6]

    @classmethod
    def default(cls) -> "Engine":
        """The process-wide embedded engine used by clients created without one."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    # ------------------------------------------------------------------ plumbing
    def _worker(self, device: str) -> DeviceWorker:
        with self._lock:
            if device not in self._workers:
                self._workers[device] = DeviceWorker(device)
            return self._workers[device]

    def _submit(self, device: str, run_id: str | None, op: str, fn: Callable[[], Any],
                after: Callable[[Any, bool], None] | None = None) -> Future:
        stats = None
        if run_id is not None:
            with self._lock:
                stats = self._stats.setdefault(run_id, _Stats())
                stats.submitted += 1
        t_submit = time.perf_counter()

        def task() -> Any:
            t_start = time.perf_counter()
            if stats is not None:
                stats.running = op
            ok = False
            try:
                result = fn()
                ok = True
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the bookkeeping
                result = exc
            t_end = time.perf_counter()
            if stats is not None:
                with self._lock:
                    stats.running = None
                    stats.completed += ok
                    stats.failed += not ok
                    stats.wait_s += t_start - t_submit
                    stats.exec_s += t_end - t_start
            timing = getattr(result, "timing", None) if ok else None
            if isinstance(timing, dict):
                timing["queue_wait"] = t_start - t_submit
                timing["total"] = t_end - t_submit
            if after is not None:  # still on the worker, before the run's next request
                after(result, ok)
            if not ok:
                raise result
            return result

        def cancelled() -> None:
            if stats is not None:
                with self._lock:
                    stats.cancelled += 1

        return self._worker(device).submit(task, key=run_id, on_cancel=cancelled)

    def _run(self, run_id: str) -> Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            known = ", ".join(sorted(self._runs)) or "none"
            raise RunNotFoundError(f"run_id: no run {run_id!r} in this engine (known runs: {known})")
        return run

    def _device_of(self, run_id: str) -> str:
        with self._lock:
            run = self._runs.get(run_id)
        return str(run.device.type if run.device.index is None else run.device) if run is not None \
            else default_device()

    # ------------------------------------------------------------------ runs
    def _check_config(self, config: dict[str, Any]) -> None:
        """A hook for engines that constrain the config further (the sharded engine fixes the device)."""

    def _reserve(self, run_id: str, base_model: str | None, config: dict[str, Any]
                 ) -> tuple[RunConfig | None, Future | None]:
        """Validate a run's config and reserve ``run_id``: ``(config, None)``, or ``(None, a failed future)``."""
        known = {f.name for f in fields(RunConfig)}
        unknown = sorted(set(config) - known)
        err: Exception | None = None
        cfg = None
        try:
            if unknown:
                raise TypeError(f"create_run: unknown argument(s) {unknown}; accepted: {sorted(known)}")
            if base_model is not None:
                config["base_model"] = base_model
            self._check_config(config)
            cfg = RunConfig(**config)
            cfg.validate()
        except (ValueError, TypeError) as exc:
            err = exc
        with self._lock:
            if err is None and (run_id in self._runs or run_id in self._pending_ids):
                err = ValueError(f"run_id: a run {run_id!r} is already open in this engine")
            if err is None:
                self._pending_ids.add(run_id)
        if err is None:
            return cfg, None
        f: Future = Future()
        f.set_exception(err)
        return None, f

    def create_run(self, base_model: str | None = None, **config: Any) -> Future:
        """Queue the creation of a run; the future's result is ``get_run(run_id)``."""
        return self.open_run(f"run-{next(self._counter):03d}-{self._session}", base_model, **config)

    def open_run(self, run_id: str, base_model: str | None = None, *, checkpoint: str | None = None,
                 **config: Any) -> Future:
        """Queue the creation of run ``run_id`` in ``<root_dir>/<run_id>`` (an existing directory is reused, its
        metrics appended to), then, with ``checkpoint``, ``load_state(checkpoint)``. ``create_run`` with a given id;
        a server reopens its runs with it after a restart. Errors as ``create_run``'s, in the future."""
        cfg, failed = self._reserve(run_id, base_model, config)
        if failed is not None:
            return failed
        device = cfg.device or default_device()
        cfg.device = device

        def make() -> dict[str, Any]:
            try:
                run = Run(run_id, cfg, run_dir=os.path.join(self.root_dir, run_id),
                          reference_cache=self.reference_cache, device=device,
                          max_request_bytes=self.max_request_bytes)
                load_or_close(run, checkpoint)
            finally:
                with self._lock:
                    self._pending_ids.discard(run_id)
            with self._lock:
                self._runs[run_id] = run
            return run.info()

        return self._submit(device, run_id, "create_run", make)

    def list_runs(self) -> list[dict[str, Any]]:
        with self._lock:
            runs = list(self._runs.values())
        return [r.info() for r in runs]

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._run(run_id).info()

    def request(self, run_id: str, op: str, *args: Any, **kwargs: Any) -> Future:
        """Queue ``Run.<op>(*args, **kwargs)`` for ``run_id`` (an unknown run fails in the future)."""
        if op not in _OPS:
            raise ValueError(f"op: expected one of {sorted(_OPS)}, got {op!r}")
        return self.call(run_id, op, lambda run: getattr(run, op)(*args, **kwargs))

    def call(self, run_id: str, op: str, fn: Callable[[Run], Any],
             after: Callable[[Any, bool], None] | None = None) -> Future:
        """Queue ``fn(run)`` in ``run_id``'s FIFO, on its device's worker, counted in its statistics as ``op``
        (how a server runs a request together with its own bookkeeping). ``after(result_or_exception, ok)`` runs on
        the worker once the statistics and ``timing`` are updated, before the run's next request. An unknown run
        fails in the future."""
        with self._lock:
            known = run_id in self._runs or run_id in self._pending_ids
        if not known:  # fails at once, and leaves no statistics behind for a run that does not exist
            f: Future = Future()
            try:
                self._run(run_id)
            except RunNotFoundError as exc:
                f.set_exception(exc)
            return f
        return self._submit(self._device_of(run_id), run_id, op, lambda: fn(self._run(run_id)), after)

    def queue_stats(self, run_id: str | None = None) -> dict[str, Any]:
        """Per-run request counts: ``submitted = completed + failed + cancelled + pending``."""
        if run_id is not None:
            self._run(run_id)  # RunNotFoundError for an unknown run
        with self._lock:
            items = [(run_id, self._stats.get(run_id, _Stats()))] if run_id is not None else list(self._stats.items())
        out = {}
        for rid, s in items:
            done = s.completed + s.failed
            out[rid] = {"submitted": s.submitted, "completed": s.completed, "failed": s.failed,
                        "cancelled": s.cancelled, "pending": s.submitted - done - s.cancelled, "running": s.running,
                        "mean_queue_wait_s": s.wait_s / done if done else 0.0,
                        "mean_exec_s": s.exec_s / done if done else 0.0}
        return out[run_id] if run_id is not None else out

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.close(wait=True)
        with self._lock:
            runs = list(self._runs.values())
        for r in runs:
            r.close()


_OPS = {"forward_backward", "forward", "optim_step", "sample", "save_state", "load_state", "score",
        "compute_logprobs", "export_model"}

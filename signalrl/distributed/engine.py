"""The sharded engine: rank 0 hosts :class:`ShardedEngine` (an :class:`~signalrl.engine.Engine` — the same
requests, futures and clients), the other ranks run :func:`follow`.

Every request that touches a run is broadcast from rank 0's worker thread to all ranks (one command at a time,
in the order rank 0 executes them); every rank executes it on its :class:`~signalrl.distributed.run.ShardedRun`
with the same arguments, and a status exchange makes all ranks return or all raise. Rank 0's result is the
request's result. When idle, rank 0 sends a heartbeat every ``timeout_s / 4`` so followers never wait longer than
the collective timeout; a rank that dies or hangs makes the others raise within ``timeout_s``, after which the
engine refuses further requests with :class:`RankFailedError` (restart the job: the group is out of step).

Commands between ranks travel in the remote API's wire format (:mod:`signalrl.wire`: JSON, tensors as
safetensors) as bytes in a tensor broadcast (:meth:`~signalrl.distributed.comm.Comm.broadcast_encoded`): nothing
is pickled. A command is ``{"kind": "open" | "op" | "ping" | "stop", ...}``; a request argument that cannot travel
(not a JSON value, tensor or numpy array) fails that request on rank 0 before anything is sent.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

from signalrl.engine.config import RunConfig
from signalrl.engine.engine import _OPS, Engine, load_or_close
from signalrl.engine.models import load_base_model
from signalrl.engine.frozen_models import ReferenceCache

from .comm import Comm, RankFailedError, encode, init, is_comm_error, run_everywhere
from .run import ShardedRun


def _build_run(comm: Comm, root_dir: str, run_id: str, cfg: dict, checkpoint: str | None,
               reference_cache: ReferenceCache, max_request_bytes: int | None, split) -> ShardedRun:
    # the config came through JSON: tuples (adam_betas) arrive as lists
    cfg = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(RunConfig, k, None), tuple) else v
           for k, v in cfg.items()}
    run = ShardedRun(run_id, RunConfig(**cfg), comm=comm, run_dir=os.path.join(root_dir, run_id),
                     reference_cache=reference_cache, device=str(comm.device), max_request_bytes=max_request_bytes,
                     split=split)
    load_or_close(run, checkpoint)
    return run


def _reference_cache(size: int) -> ReferenceCache:
    return ReferenceCache(lambda name, **kw: load_base_model(name, arg="reference_model", **kw)[0], capacity=size)


class _LeaderRun:
    """Rank 0's handle on a sharded run: request methods broadcast and run everywhere; the rest is local."""

    def __init__(self, engine: "ShardedEngine", run: ShardedRun):
        self._engine = engine
        self._run = run

    def __getattr__(self, name: str) -> Any:
        if name in _OPS:
            return functools.partial(self._engine._collective_op, self._run, name)
        return getattr(self._run, name)


class ShardedEngine(Engine):
    """``ShardedEngine(root_dir=None, *, comm, split=None, ...)`` on rank 0 (see :func:`start`)."""

    def __init__(self, root_dir: str | None = None, *, comm: Comm, split=None, reference_cache_size: int = 2,
                 max_request_bytes: int | None = None):
        super().__init__(root_dir, reference_cache_size=reference_cache_size, max_request_bytes=max_request_bytes)
        if not comm.is_leader:
            raise ValueError("ShardedEngine: rank 0 hosts the engine; the other ranks call follow()")
        self.comm = comm
        self.split = split
        self._broken: str | None = None
        self._last_send = time.monotonic()
        self._stop = threading.Event()
        self._ping_pending = False
        self._closed = False
        self._heartbeat = threading.Thread(target=self._beat, name="signal-dist-heartbeat", daemon=True)
        self._heartbeat.start()

    @property
    def device(self) -> str:
        return str(self.comm.device)

    # ------------------------------------------------------------------ commands
    def _send(self, cmd: dict) -> dict:
        """Broadcast ``cmd``; returns it as the other ranks decode it (rank 0 executes that very copy)."""
        if self._broken is not None:
            raise RankFailedError(self._broken)
        body = encode(cmd)  # a TypeError here fails the request alone: nothing was sent
        try:
            sent = self.comm.broadcast_encoded(body, src=0)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
        self._last_send = time.monotonic()
        return sent

    def _fail(self, exc: BaseException) -> None:
        self._broken = (f"the sharded engine lost a rank ({type(exc).__name__}: {str(exc)[:300]}); "
                        f"a rank died or did not answer within {self.comm.timeout_s:g} s. Restart the job.")
        raise RankFailedError(self._broken) from exc

    def _everywhere(self, fn, what: str) -> Any:
        try:
            return run_everywhere(self.comm, fn, what)
        except Exception as exc:  # noqa: BLE001
            if is_comm_error(exc):
                self._fail(exc)
            raise

    def _collective_op(self, run: ShardedRun, op: str, *args: Any, **kwargs: Any) -> Any:
        cmd = self._send({"kind": "op", "run_id": run.run_id, "op": op, "args": list(args), "kwargs": kwargs})
        return self._everywhere(lambda: getattr(run, op)(*cmd["args"], **cmd["kwargs"]), op)

    def _beat(self) -> None:
        interval = max(self.comm.timeout_s / 4, 0.05)
        while not self._stop.wait(interval / 2):
            if self._ping_pending or self._broken is not None or time.monotonic() - self._last_send < interval:
                continue
            self._ping_pending = True

            def ping() -> None:
                self._ping_pending = False
                if time.monotonic() - self._last_send >= interval:
                    self._send({"kind": "ping"})
            try:
                self._worker(self.device).submit(ping, key="__heartbeat__")
            except RuntimeError:  # closed
                return

    # ------------------------------------------------------------------ runs
    def _check_config(self, config: dict[str, Any]) -> None:
        if config.get("device") not in (None, self.device, self.comm.device.type):
            raise ValueError(f"device: a sharded engine places every run on its ranks' devices "
                             f"({self.device} here), got {config['device']!r}")
        config["device"] = self.device

    def open_run(self, run_id: str, base_model: str | None = None, *, checkpoint: str | None = None,
                 **config: Any) -> Future:
        cfg, failed = self._reserve(run_id, base_model, config)
        if failed is not None:
            return failed
        cfg_dict = asdict(cfg)

        def make() -> dict[str, Any]:
            try:
                cmd = self._send({"kind": "open", "root_dir": self.root_dir, "run_id": run_id, "config": cfg_dict,
                                  "checkpoint": checkpoint})
                run = self._everywhere(lambda: _build_run(self.comm, self.root_dir, run_id, cmd["config"], checkpoint,
                                                          self.reference_cache, self.max_request_bytes, self.split),
                                       "create_run")
            finally:
                with self._lock:
                    self._pending_ids.discard(run_id)
            with self._lock:
                self._runs[run_id] = _LeaderRun(self, run)  # type: ignore[assignment]
            return run.info()

        return self._submit(self.device, run_id, "create_run", make)

    def close(self) -> None:
        """Stop the followers (after the queued requests), then the engine."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._broken is None:
            try:
                self._worker(self.device).submit(lambda: self._send({"kind": "stop"}), key="__heartbeat__").result(
                    timeout=None)
            except Exception:  # noqa: BLE001 - a broken group: nothing to stop
                pass
        super().close()


def follow(comm: Comm, *, split=None, reference_cache_size: int = 2, max_request_bytes: int | None = None) -> None:
    """The loop of ranks other than 0: execute rank 0's commands until it says stop. A request error is shared
    with every rank and the loop goes on; a communication error (rank 0 died, or a timeout) ends it by raising
    :class:`RankFailedError`."""
    runs: dict[str, ShardedRun] = {}
    cache = _reference_cache(reference_cache_size)
    try:
        while True:
            try:
                cmd = comm.broadcast_encoded(None, src=0)
            except Exception as exc:  # noqa: BLE001
                raise RankFailedError(f"rank {comm.rank}: lost rank 0 ({type(exc).__name__}: {str(exc)[:300]}) "
                                      f"within the {comm.timeout_s:g} s timeout") from exc
            kind = cmd["kind"]
            if kind == "ping":
                continue
            if kind == "stop":
                return
            try:
                if kind == "open":
                    runs[cmd["run_id"]] = run_everywhere(comm, functools.partial(
                        _build_run, comm, cmd["root_dir"], cmd["run_id"], cmd["config"], cmd["checkpoint"], cache,
                        max_request_bytes, split), "create_run")
                elif kind == "op":
                    fn = getattr(runs[cmd["run_id"]], cmd["op"])
                    run_everywhere(comm, functools.partial(fn, *cmd["args"], **cmd["kwargs"]), cmd["op"])
            except Exception as exc:  # noqa: BLE001
                if is_comm_error(exc):
                    raise RankFailedError(f"rank {comm.rank}: a collective failed ({str(exc)[:300]})") from exc
                # a request error: every rank raised it; wait for the next command
    finally:
        for run in runs.values():
            run.close()


def start(root_dir: str | None = None, *, timeout_s: float | None = None, backend: str | None = None, split=None,
          **engine_kwargs: Any) -> ShardedEngine | None:
    """Call on every rank of a ``torchrun`` job. Rank 0 gets a :class:`ShardedEngine` (hand it to
    ``AsyncSignalClient(engine=...)``/``SignalClient(engine=...)``, ``close()`` it at the end); the other ranks
    serve it until it closes, then get ``None``."""
    comm = init(timeout_s, backend)
    if comm.is_leader:
        return ShardedEngine(root_dir, comm=comm, split=split, **engine_kwargs)
    follow(comm, split=split, **engine_kwargs)
    return None

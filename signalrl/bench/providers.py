"""Providers: who computes a case.

* ``reference`` — :mod:`signalrl.reference`, eager PyTorch (the ground truth).
* ``compile``   — ``torch.compile`` of that same reference function (default mode; one compiled
  function per op, reused across shapes; compilation happens during warm-up and is not timed).
* ``native``    — :mod:`signalrl.ops` with ``use_backend("native")`` (C++ kernels, CPU tensors).
* ``triton``    — :mod:`signalrl.ops` with ``use_backend("triton")`` (CUDA; the Triton interpreter on
  CPU is only a smoke test and is labelled so, never a performance figure).
* peers, when importable: ``liger`` (Liger-Kernel), ``cce`` (Cut Cross-Entropy), and ``verl_loop``, a
  verl-style GAE loop over T written here as the baseline the field runs today.

A provider that cannot run a case raises one of the exceptions below; the runner turns it into a
row whose ``status`` says why ("not installed", "unavailable: …", "skipped: …"). Nothing is faked:
a signal backend that would silently fall back to the reference for an op is reported unavailable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

SIGNAL_PROVIDERS = ("native", "triton")
PROVIDERS = ("reference", "compile", "native", "triton", "liger", "cce", "verl_loop")
PEERS = ("liger", "cce", "verl_loop")


class NotInstalled(Exception):
    """A peer package is not importable."""


class Unavailable(Exception):
    """The provider exists but cannot run this case here (message says why)."""


class Skipped(Exception):
    """Deliberately not run in this preset (message says why)."""


@dataclass
class Impl:
    """A callable computing one case: ``fn(**inputs) -> Tensor | tuple[Tensor, ...]``.

    ``ctx`` is entered around the calls of a measurement (e.g. forcing a backend): once around all of them, or
    around each call when providers are timed in turns (paired cases); ``note`` ends up in the row (e.g. "triton
    interpreter").
    """

    fn: Callable
    ctx: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    note: str = ""
    wrt: list = field(default_factory=list)  # extra tensors to differentiate (e.g. model parameters)
    smoke: bool = False                       # interpreter: time one call, not a performance figure
    warm: bool = False                        # run one untimed call per mode first (e.g. to compile)


def kernel_for(op: str) -> str | None:
    """The forward kernel op the public op ``op`` runs (:data:`signalrl.ops.KERNEL_OF`), None for ops without one."""
    from signalrl.ops import KERNEL_OF

    return KERNEL_OF.get(op)


def require(module: str) -> object:
    """Import a peer package or raise NotInstalled."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise NotInstalled(f"{module.split('.')[0]} is not installed")
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # installed but broken (e.g. wrong torch)
        raise Unavailable(f"import {module} failed: {exc}") from exc


def reference_impl(call: Callable) -> Impl:
    """``call(ops_module, **inputs)`` run against :mod:`signalrl.reference`."""
    try:
        ref = importlib.import_module("signalrl.reference")
    except ImportError as exc:
        raise Unavailable(f"signalrl.reference: {exc}") from exc

    def fn(**x):
        return call(ref, **x)

    return Impl(fn)


_COMPILED: dict[str, Callable] = {}


def compile_impl(key: str, call: Callable, device: torch.device) -> Impl:
    """torch.compile of the reference; one compiled function per ``key`` (op variant)."""
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    if device.type == "cpu" and not any(shutil_which(c) for c in ("c++", "g++", "clang++")):
        raise Unavailable("torch.compile on CPU needs a C++ compiler; none found")
    if key not in _COMPILED:
        ref = importlib.import_module("signalrl.reference")
        # A fresh code object per op: dynamo caches compiled graphs per code object, so one shared
        # wrapper would pile every op's graphs onto one cache and hit the recompile limit.
        ns = {"call": call, "ref": ref}
        src = "def compiled_reference(**x):\n    return call(ref, **x)\n"
        exec(compile(src, f"<benchmarks compile {key}>", "exec"), ns)  # noqa: S102 - fixed source
        _configure_dynamo()
        _COMPILED[key] = torch.compile(ns["compiled_reference"])
    return Impl(_COMPILED[key], warm=True)


def _configure_dynamo() -> None:
    """Enough cache entries for every shape/dtype of a sweep, and an error (a reported row) rather
    than a silent fall-back to eager if the limit is ever hit."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 32))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def signal_impl(backend: str, op: str, call: Callable, probe: torch.Tensor) -> Impl:
    """``call(signalrl.ops, **inputs)`` with ``backend`` forced.

    ``probe`` is the tensor the op dispatches on (its device decides). Raises Unavailable when the
    backend cannot run here or has no kernel for ``op`` (the op layer would fall back to reference).
    """
    try:
        ops = importlib.import_module("signalrl.ops")
        backend_mod = importlib.import_module("signalrl.ops._backend")
    except ImportError as exc:
        raise Unavailable(f"signalrl.ops: {exc}") from exc
    try:
        op_fn = getattr(ops, op)
    except (AttributeError, ImportError) as exc:
        raise Unavailable(f"signalrl.ops.{op} is not available yet ({type(exc).__name__}: {exc})") from exc
    if inspect.ismodule(op_fn):  # a submodule of the same name shadows the lazily exported op
        op_fn = getattr(op_fn, op)
    if backend == "triton" and probe.device.type != "cuda":
        if not interpreter_on():
            raise Unavailable("no CUDA device (the Triton interpreter is for smoke runs only: --triton-interpret)")
    fwd = kernel_for(op)
    if fwd is None:
        raise Unavailable(f"no kernel mapping for {op}")
    try:
        with ops.use_backend(backend):
            chosen = backend_mod.backend_for(fwd, probe)
    except Exception as exc:  # the op layer explains why the forced backend cannot run
        raise Unavailable(_short(str(exc))) from exc
    if chosen != backend:
        raise Unavailable(f"no {backend} kernel for {op} on {probe.device.type} (the op would run the reference)")

    def fn(**x):
        return call(ops, **x)

    interp = backend == "triton" and probe.device.type != "cuda"
    note = "triton interpreter: not a performance figure" if interp else ""
    return Impl(fn, ctx=lambda: ops.use_backend(backend), note=note, smoke=interp)


def _short(msg: str, n: int = 160) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def versions() -> dict[str, str]:
    import platform

    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: report, do not fail
        out["triton"] = "none"
    for pkg, name in (("liger_kernel", "liger"), ("cut_cross_entropy", "cce")):
        if importlib.util.find_spec(pkg) is not None:
            try:
                from importlib.metadata import version

                out[name] = version(pkg.replace("_", "-"))
            except Exception:  # noqa: BLE001
                out[name] = "installed"
    return out

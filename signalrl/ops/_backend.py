"""Backend choice for the op layer.

Backends, in order of preference for a given tensor:

- ``triton``: CUDA tensors, or any tensors when ``TRITON_INTERPRET=1`` (how CPU machines test kernels);
- ``native``: CPU tensors, when the C++ extension in ``csrc/`` builds (see :mod:`signalrl.native`);
- ``reference``: always (:mod:`signalrl.reference`, plain PyTorch autograd).

An op uses a backend only if that backend implements its kernel op (:meth:`signalrl.ops._library.KernelOp.implemented_by`).
Force a backend with the environment variable ``SIGNAL_BACKEND=triton|native|reference`` or the
context manager :func:`use_backend`; a forced backend that the op does not implement for the
tensor's device falls back to ``reference``, and one that cannot run on this machine at all
(Triton without CUDA or the interpreter, native without a compiler) raises.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from ._library import KernelOp

BACKENDS = ("triton", "native", "reference")

# A stack rather than a ContextVar: torch.compile reads module globals as guarded constants.
_forced_stack: list[str] = []


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (nests; innermost wins)."""
    _forced_stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced_stack.pop()


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``SIGNAL_BACKEND``, if any."""
    if _forced_stack:
        return _forced_stack[-1]
    env = os.environ.get("SIGNAL_BACKEND", "").strip().lower()
    return _check_name(env, "SIGNAL_BACKEND") if env else None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_triton_importable: bool | None = None


def triton_usable(device: torch.device) -> bool:
    """Triton can run on ``device``: CUDA with triton installed, or any device under the interpreter."""
    global _triton_importable
    if _triton_importable is None:
        _triton_importable = importlib.util.find_spec("triton") is not None
    if not _triton_importable:
        return False
    return interpreter_enabled() or device.type == "cuda"


def _native_module():
    try:
        from .. import native
    except ImportError:  # a build of signalrl without the native loader
        return None
    return native


def native_usable(device: torch.device) -> bool:
    native = _native_module()
    return device.type == "cpu" and native is not None and native.available()


def _kernel(kernel: "str | KernelOp") -> "KernelOp":
    from ._library import KERNELS

    name = getattr(kernel, "name", kernel)
    if name not in KERNELS:
        raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
    return KERNELS[name]


def _usable(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return triton_usable(device)
    if backend == "native":
        return native_usable(device)
    return True


def backend_for(kernel: "str | KernelOp", tensor: torch.Tensor) -> str:
    """Which backend runs ``kernel`` (a kernel op or its name, e.g. ``"token_logprobs_fwd"``) for ``tensor`` now.

    Under ``torch.compile`` the choice is made once, while tracing, and baked into the graph.
    """
    return _choose(getattr(kernel, "name", kernel), tensor.device.type)


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` at import time:
    dynamo imports triton, and triton must be imported only after TRITON_INTERPRET is set."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def implements(kernel_name: str, backend: str) -> bool:
    """Whether ``backend`` has the kernel op ``kernel_name`` (:meth:`KernelOp.implemented_by`); a constant under
    ``torch.compile``, for the op modules' plan choices."""
    return _kernel(kernel_name).implemented_by(backend)


# _choose's answers while nothing they depend on changes: the forced backend, the environment variables read below
# and the native extension's state (cached only once it is loaded or has failed, when it no longer changes).
_choices: dict[tuple, str] = {}


@_constant_under_compile
def _choose(kernel_name: str, device_type: str) -> str:
    env = os.environ
    key = (kernel_name, device_type, _forced_stack[-1] if _forced_stack else None, env.get("SIGNAL_BACKEND"),
           env.get("TRITON_INTERPRET"), env.get("SIGNAL_NATIVE"))
    hit = _choices.get(key)
    if hit is not None:
        return hit
    choice = _choose_uncached(kernel_name, device_type)
    native = _native_module()
    if native is None or getattr(native, "_loaded_from", None) is not None or getattr(native, "_error", None) is not None:
        _choices[key] = choice
    return choice


def _choose_uncached(kernel_name: str, device_type: str) -> str:
    device = torch.device(device_type)
    kernel = _kernel(kernel_name)
    forced = forced_backend()
    if forced is not None:
        if forced == "reference":
            return "reference"
        if forced == "triton" and importlib.util.find_spec("triton") is None:
            raise RuntimeError("backend 'triton' was forced but triton is not installed")
        if forced == "triton" and device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                "backend 'triton' was forced for a CPU tensor; set TRITON_INTERPRET=1 before importing "
                "triton to run kernels in the interpreter, or move the tensors to CUDA"
            )
        if forced == "native" and device.type == "cpu":
            native = _native_module()
            if native is None or not native.available():
                why = getattr(native, "why", lambda: "signalrl.native is missing")() if native else "signalrl.native is missing"
                raise RuntimeError(f"backend 'native' was forced but the extension is unavailable: {why}")
        if _usable(forced, device) and kernel.implemented_by(forced):
            return forced
        return "reference"
    for backend in ("triton", "native"):
        if _usable(backend, device) and kernel.implemented_by(backend):
            return backend
    return "reference"


def available_backends(kernel: "str | KernelOp", device: torch.device | str = "cpu") -> list[str]:
    """Every backend that can run ``kernel`` (a kernel op or its name) on ``device`` on this machine (reference
    last)."""
    device = torch.device(device)
    k = _kernel(kernel)
    out = [b for b in ("triton", "native") if _usable(b, device) and k.implemented_by(b)]
    return out + ["reference"]

"""Kernel ops: each kernel's contract — one ``torch.library`` schema and one fake — written once.

A kernel op ``torch.ops.signalrl.<name>`` is implemented per device, and the dispatcher picks by the tensors:

- CUDA: the Triton launcher of ``signalrl/kernels/<family>.py`` (registered with :meth:`KernelOp.triton` from the
  op module; the launcher is imported on its first call, so importing signalrl does not import triton);
- CPU: the C++ kernel of ``csrc/cpu/<family>.cpp``, registered there by ``TORCH_LIBRARY_IMPL(signalrl, CPU, m)``
  when :mod:`signalrl.native` loads the extension.

Under the Triton interpreter (``TRITON_INTERPRET=1``, how CPU machines test the Triton kernels) Triton runs on CPU
tensors too, where the CPU key belongs to C++; so each op has a twin ``<name>_interpreted`` with the same schema
and fake whose CPU implementation is the Triton launcher. :meth:`KernelOp.op` says which of the two runs a backend.

The fake gives the outputs' shapes and dtypes (``torch.compile``, FakeTensor); autograd is registered on the
forward ops by their op modules (:meth:`KernelOp.register_autograd`).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

LIBRARY = "signalrl"
_lib = torch.library.Library(LIBRARY, "FRAGMENT")
_INTERPRETED = "_interpreted"

#: every kernel op by name (the backend choice looks them up by name: a string is a constant under torch.compile)
KERNELS: dict[str, "KernelOp"] = {}


class KernelOp:
    """One kernel's contract: ``KernelOp(name, schema, fake)`` defines ``signalrl::<name>`` and its twin.

    Args:
        name: the kernel's name, the same in every layer (``kl_penalty_fwd``: the Triton launcher
            ``signalrl.kernels.kl.kl_penalty_fwd``, the C++ ``signalrl::kl_penalty_fwd`` of ``csrc/cpu/kl.cpp``).
        schema: the arguments and returns, ``"(Tensor logprobs, ...) -> Tensor"``; scalar settings come from the
            family's params object (:mod:`signalrl.kernels.params`).
        fake: the shape function, called with the schema's arguments.
    """

    def __init__(self, name: str, schema: str, fake: Callable):
        self.name = name
        self.schema = schema
        for qualname in (name, name + _INTERPRETED):
            _lib.define(qualname + schema)
            torch.library.register_fake(f"{LIBRARY}::{qualname}", fake, lib=_lib)
        namespace = getattr(torch.ops, LIBRARY)
        self.dispatched = getattr(namespace, name).default
        self.interpreted = getattr(namespace, name + _INTERPRETED).default
        self.has_triton = False
        KERNELS[name] = self

    def triton(self, launcher: Callable) -> Callable:
        """Decorator: ``launcher`` (the schema's arguments) implements the op for CUDA and the twin for CPU."""
        _lib.impl(self.name, launcher, "CUDA")
        _lib.impl(self.name + _INTERPRETED, launcher, "CPU")
        self.has_triton = True
        return launcher

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """The same backward for the op and its twin; ``ctx.variant`` tells the backward which of the two ran, so it
        calls the same variant of its backward op (:meth:`variant`)."""
        for qualname, variant in ((self.name, "dispatched"), (self.name + _INTERPRETED, "interpreted")):
            def setup(ctx, inputs, output, _variant=variant):
                ctx.variant = _variant
                setup_context(ctx, inputs, output)

            torch.library.register_autograd(f"{LIBRARY}::{qualname}", backward, setup_context=setup, lib=_lib)

    def variant(self, name: str) -> Callable:
        """The op (``dispatched``) or its twin (``interpreted``)."""
        return self.interpreted if name == "interpreted" else self.dispatched

    def implemented_by(self, backend: str) -> bool:
        """The backend has this kernel on this machine (``native``: the extension loaded and registered it)."""
        if backend == "triton":
            return self.has_triton and importlib.util.find_spec("triton") is not None
        if backend == "native":
            from .. import native

            return native.available() and torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{LIBRARY}::{self.name}", "CPU"
            )
        return False

    def op(self, backend: str, device: torch.device) -> Callable:
        """The op that runs ``backend`` (``triton`` or ``native``) for tensors on ``device``."""
        return self.interpreted if backend == "triton" and device.type == "cpu" else self.dispatched

    def __repr__(self) -> str:
        return f"KernelOp({LIBRARY}::{self.name}{self.schema})"


class NativeHelper:
    """A CPU-only helper op of the op layer (not a kernel of the contract: no Triton, no backend choice):
    ``signalrl::<name>`` with its schema and fake, implemented by the native extension when it loads.
    Calling the helper gives the op once its C++ kernel is registered, else None (the caller's plain-torch path)."""

    def __init__(self, name: str, schema: str, fake: Callable):
        self.name = name
        _lib.define(name + schema)
        torch.library.register_fake(f"{LIBRARY}::{name}", fake, lib=_lib)
        self._op = None

    def __call__(self):
        if self._op is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY}::{self.name}", "CPU"):
            self._op = getattr(getattr(torch.ops, LIBRARY), self.name).default
        return self._op


__all__ = ["KERNELS", "KernelOp", "LIBRARY", "NativeHelper"]

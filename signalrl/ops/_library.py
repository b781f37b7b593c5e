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
forward ops by their op modules (:meth:`KernelOp.register_autograd`), once, and serves two paths: under
``torch.compile`` the op's ``torch.library`` autograd (traced by AOTAutograd); in eager mode the same setup and
backward in a plain ``torch.autograd.Function`` around the op called below autograd, which costs a few µs a call
where the ``torch.library`` wrapper costs about 20 (the op layer's overhead is most of a small op's time on CPU).
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
        self._native_registered = False
        self._eager: dict[str, Callable] = {}
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
            self._eager[variant] = _eager_autograd(self.variant(variant), setup, backward)

    def variant(self, name: str) -> Callable:
        """The op (``dispatched``) or its twin (``interpreted``)."""
        return self.interpreted if name == "interpreted" else self.dispatched

    def implemented_by(self, backend: str) -> bool:
        """The backend has this kernel on this machine (``native``: the extension loaded and registered it)."""
        if backend == "triton":
            return self.has_triton and importlib.util.find_spec("triton") is not None
        if backend == "native":
            from .. import native

            if not native.available():
                return False
            if not self._native_registered:  # (once registered, a kernel stays: the answer is kept)
                self._native_registered = torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"{LIBRARY}::{self.name}", "CPU"
                )
            return self._native_registered
        return False

    @staticmethod
    def variant_of(backend: str, device: torch.device) -> str:
        """Which variant runs ``backend`` for tensors on ``device``: ``interpreted`` (Triton on CPU) or
        ``dispatched``."""
        return "interpreted" if backend == "triton" and device.type == "cpu" else "dispatched"

    def op(self, backend: str, device: torch.device) -> Callable:
        """The op that runs ``backend`` (``triton`` or ``native``) for tensors on ``device``: in eager mode its
        :func:`_eager_autograd` caller when autograd is registered, the op itself under ``torch.compile``."""
        variant = self.variant_of(backend, device)
        eager = None if torch.compiler.is_compiling() else self._eager.get(variant)
        return eager if eager is not None else self.variant(variant)

    def __repr__(self) -> str:
        return f"KernelOp({LIBRARY}::{self.name}{self.schema})"


def _eager_autograd(op: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``op`` with its registered autograd for eager mode: a ``torch.autograd.Function`` whose forward calls the op
    below the autograd dispatch key (straight to its device kernel) and runs ``setup_context``, and whose backward is
    the registered backward — the same two functions, so both paths compute the same gradients. Without a tensor that
    requires grad (or with grad mode off) the op is called below autograd alone."""

    class EagerAutograd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerAutograd.__name__ = EagerAutograd.__qualname__ = f"{op.name().split('::')[-1]}_eager"

    def call(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return EagerAutograd.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


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

    def passes(self, *args) -> bool:
        """For a value check (an op answering a bool tensor, true = something is bad): True when the native pass ran
        and found nothing; False when the extension is not loaded or it found something — the caller's Python rule
        then decides and locates the bad value for its message."""
        op = self()
        return op is not None and not bool(op(*args))


def is_kernel_op(qualname: str) -> bool:
    """Whether ``qualname`` (a profiler event's name, ``signalrl::<name>``) is a kernel op or its Triton twin — not a
    host-side helper of the op layer (:class:`NativeHelper`: value checks), which runs on every backend."""
    namespace, _, name = qualname.partition("::")
    return namespace == LIBRARY and (name.removesuffix(_INTERPRETED) in KERNELS)


def kernels_run(fn: Callable[[], object]) -> set[str]:
    """The kernel ops (:func:`is_kernel_op`) that ``fn()`` dispatches, forward and backward, by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if is_kernel_op(e.name)}


__all__ = ["KERNELS", "KernelOp", "LIBRARY", "NativeHelper", "is_kernel_op", "kernels_run"]

"""Check mode: run the reference beside every op call and compare values and gradients.

Turn on with ``SIGNAL_CHECK=1`` or ``with signalrl.ops.check_mode():``. For each op call the
reference runs on float64 copies of the inputs; outputs are compared at once and, on backward,
gradients too. A mismatch raises :class:`SignalCheckError` with the max absolute and relative
error. Tolerance (relative, by the norm of the difference, per output) follows the input dtype:
float32/float64 → 1e-5, bfloat16/float16 → 2e-2. Check mode is for debugging: it costs a full
reference pass and a second backward, and it is skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

_check_stack: list[bool] = []


class SignalCheckError(AssertionError):
    """A fast backend disagreed with the reference beyond tolerance."""


@contextlib.contextmanager
def check_mode(enabled: bool = True) -> Iterator[None]:
    _check_stack.append(enabled)
    try:
        yield
    finally:
        _check_stack.pop()


def check_enabled() -> bool:
    if torch.compiler.is_compiling():
        return False
    if _check_stack:
        return _check_stack[-1]
    return os.environ.get("SIGNAL_CHECK", "") not in ("", "0")


def tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5


def compare(what: str, got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Raise if ‖got − expected‖ / max(‖expected‖, tiny) > rtol, or if either is non-finite where the other is not."""
    g = got.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if g.shape != e.shape:
        raise SignalCheckError(f"{what}: shape {tuple(g.shape)} != reference {tuple(e.shape)}")
    finite_g, finite_e = torch.isfinite(g), torch.isfinite(e)
    if not torch.equal(finite_g, finite_e):
        raise SignalCheckError(f"{what}: non-finite values differ from the reference (NaN/inf at different places)")
    g, e = g[finite_g], e[finite_e]
    diff = (g - e).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = (diff / e.abs().clamp_min(1e-30)).max().item() if diff.numel() else 0.0
    norm_rel = (diff.norm() / e.norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
    # a 0-d result (a mean, a loss) can cancel to ~0: hold it to rtol in absolute terms as well
    scale = e.abs().max().item() if e.numel() else 0.0
    floor = 1.0 if e.numel() == 1 else 1e-12
    if norm_rel > rtol and max_abs > rtol * max(scale, floor):
        raise SignalCheckError(
            f"{what}: max abs error {max_abs:.3e}, max rel error {max_rel:.3e}, "
            f"norm-relative error {norm_rel:.3e} > tolerance {rtol:.1e}"
        )


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    flat: list[torch.Tensor] = []
    for o in out:
        flat.extend(_flat_tensors(o))
    return flat


def _rebuild(template, tensors: list[torch.Tensor]):
    it = iter(tensors)

    def go(t):
        if isinstance(t, torch.Tensor):
            return next(it)
        if isinstance(t, dict):
            return {k: (next(it) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
        return type(t)(go(x) for x in t)

    return go(template)


class _Checked(torch.autograd.Function):
    """Identity on the fast outputs whose backward also checks input gradients against the reference."""

    @staticmethod
    def forward(ctx, op_name, fast_fn, ref_fn, holder, rtol, *flat_inputs):
        leaves = [x.detach().requires_grad_(x.requires_grad) if _is_float(x) else x for x in flat_inputs]
        ref_leaves = [
            x.detach().to(torch.float64).requires_grad_(x.requires_grad) if _is_float(x) else x for x in flat_inputs
        ]
        with torch.enable_grad():
            fast_out = fast_fn(*leaves)
            ref_out = ref_fn(*ref_leaves)
        fast_flat, ref_flat = _flat_tensors(fast_out), _flat_tensors(ref_out)
        for i, (f, r) in enumerate(zip(fast_flat, ref_flat)):
            compare(f"{op_name}: output {i}", f, r, rtol)
        ctx.op_name, ctx.rtol = op_name, rtol
        ctx.fast_flat, ctx.ref_flat = fast_flat, ref_flat
        ctx.leaves, ctx.ref_leaves = leaves, ref_leaves
        holder["template"] = fast_out
        return tuple(f.detach() for f in fast_flat)

    @staticmethod
    def backward(ctx, *grads):
        outs = [(f, r, g) for f, r, g in zip(ctx.fast_flat, ctx.ref_flat, grads) if f.requires_grad and g is not None]
        wanted = [i for i, x in enumerate(ctx.leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
        result = [None] * len(ctx.leaves)
        if outs and wanted:
            fast_g = torch.autograd.grad(
                [o[0] for o in outs], [ctx.leaves[i] for i in wanted], [o[2] for o in outs], allow_unused=True
            )
            ref_g = torch.autograd.grad(
                [o[1] for o in outs], [ctx.ref_leaves[i] for i in wanted],
                [o[2].to(torch.float64) for o in outs], allow_unused=True,
            )
            for i, fg, rg in zip(wanted, fast_g, ref_g):
                if fg is not None and rg is not None:
                    compare(f"{ctx.op_name}: gradient of input {i}", fg, rg, ctx.rtol)
                result[i] = fg
        return (None, None, None, None, None, *result)


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def checked(op_name: str, fast_fn: Callable, ref_fn: Callable, inputs: Sequence, dtype: torch.dtype):
    """Run ``fast_fn(*inputs)`` and ``ref_fn(*inputs_in_float64)``, compare their outputs, and
    return the fast outputs (same structure: tensor, tuple or dict of tensors) wired so that
    backward also compares the input gradients. ``inputs`` may contain None and non-tensors."""
    if torch.compiler.is_compiling():
        return fast_fn(*inputs)
    holder: dict = {}
    flat = _Checked.apply(op_name, fast_fn, ref_fn, holder, tolerance(dtype), *inputs)
    return _rebuild(holder["template"], list(flat))

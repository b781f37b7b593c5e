"""Benchmark cases, one module per op family.

A :class:`Case` is one op at one shape and dtype. It knows how to make its inputs, which providers
can compute it (each a factory that returns an :class:`~signalrl.bench.providers.Impl` or raises
NotInstalled / Unavailable / Skipped), which modes apply, and its work model (bytes or flops).

Each family module exposes ``cases(preset) -> list[Case]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import providers as P

FAMILIES = ("logprobs", "linear", "ppo", "gae", "losses")
MODES = ("fwd", "bwd", "full")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class Preset:
    """What a preset runs: its name picks the shapes inside each family module."""

    name: str                       # "quick" | "cpu" | "gpu"
    device: torch.device
    compile_all_shapes: bool = True  # False: the compile provider runs on headline shapes only
    run_compile: bool = True

    @property
    def quick(self) -> bool:
        return self.name == "quick"


Factory = Callable[[torch.device, dict], P.Impl]


@dataclass
class Case:
    op: str                                   # row "op", e.g. "token_logprobs+entropy"
    family: str
    params: dict[str, int]                    # shape parameters, e.g. {"N": 4096, "V": 32000}
    dtype: torch.dtype
    make: Callable[[torch.device, torch.Generator], dict]  # inputs (leaf tensors, requires_grad set)
    impls: dict[str, Factory]                 # provider -> factory(device, inputs)
    modes: tuple[str, ...] = MODES
    flops: Callable[[str], float] | None = None  # work model for compute-bound cases
    bytes_model: bool = True                  # else: no traffic model (e.g. a whole loss on a model)
    headline: bool = False                    # run first; the shapes the issues state goals for
    paired: bool = False                      # providers timed in turns within each mode (Runner._run_paired)
    notes: str = ""

    @property
    def shape(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))


def standard_impls(op: str, call: Callable, probe: str, preset: Preset, *, headline: bool,
                   compile_key: str | None = None, compile_ok: Callable[[], str | None] | None = None,
                   compile_always: bool = False) -> dict[str, Factory]:
    """reference / compile / native / triton factories for an op of signalrl.

    ``call(mod, **inputs)`` computes the case with ``mod`` = signalrl.reference or signalrl.ops;
    ``probe`` names the input the op dispatches on.
    """

    def ref(device, x):
        return P.reference_impl(call)

    def comp(device, x):
        if not preset.run_compile:
            raise P.Skipped("torch.compile is not run in the quick preset (first compile takes ≈15 s)")
        if compile_ok is not None:
            why = compile_ok()
            if why:
                raise P.Skipped(why)
        if not preset.compile_all_shapes and not headline and not compile_always:
            raise P.Skipped("torch.compile runs on headline shapes only in this preset (compile time)")
        return P.compile_impl(compile_key or op, call, device)

    def backend(name):
        def make(device, x):
            if name == "triton" and device.type != "cuda" and not headline and P.interpreter_on():
                raise P.Skipped("the Triton interpreter runs on headline shapes only (a smoke test)")
            return P.signal_impl(name, op, call, x[probe])

        return make

    return {"reference": ref, "compile": comp, "native": backend("native"), "triton": backend("triton")}


def randn(shape, device, gen, dtype=torch.float32, scale=1.0, requires_grad=False):
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale
    t = t.to(dtype)
    return t.requires_grad_(requires_grad)


def randint(high, shape, device, gen):
    return torch.randint(0, high, shape, generator=gen, device=device, dtype=torch.int64)


def all_cases(preset: Preset, families=None) -> list[Case]:
    out: list[Case] = []
    for fam in families or FAMILIES:
        mod = importlib.import_module(f"{__name__}.{fam}")
        out.extend(mod.cases(preset))
    return out

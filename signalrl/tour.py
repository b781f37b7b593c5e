"""``signal tour``: run every op on every backend available here, check it against the float64
reference and print a table (backend, max relative error of values and gradients, time).

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1 is set before triton is
imported, unless ``--no-interpret``), so the shapes are small: this is a tour, not a benchmark
(see ``signal bench``).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable


def _cases(torch, device):
    """(op name, family, kernel name, make inputs, call(ops_module, *inputs) -> scalar-able outputs)."""
    N, V, H, B, T = 64, 2048, 64, 8, 48

    def logits_in():
        return (torch.randn(N, V, device=device), torch.randint(0, V, (N,), device=device))

    def linear_in():
        return (torch.randn(N, H, device=device), torch.randn(V, H, device=device) / H**0.5,
                torch.randint(0, V, (N,), device=device))

    def ppo_in():
        lp = -torch.rand(B, T, device=device)
        return (lp, lp + 0.1 * torch.randn(B, T, device=device), torch.randn(B, T, device=device),
                (torch.rand(B, T, device=device) > 0.2).float())

    def gae_in():
        return (torch.randn(B, T, device=device), torch.randn(B, T, device=device),
                (torch.rand(B, T, device=device) > 0.2).float())

    def lppo_in():
        h, w, t = linear_in()
        lp = -torch.rand(2, N // 2, device=device)
        return (h.reshape(2, N // 2, H), w, t.reshape(2, N // 2), lp, torch.randn(2, N // 2, device=device))

    return [
        ("token_logprobs", "logprobs", "token_logprobs_fwd", logits_in,
         lambda o, x, t: o.token_logprobs(x, t, return_entropy=True)),
        ("linear_token_logprobs", "linear_logprobs", "linear_token_logprobs_fwd", linear_in,
         lambda o, h, w, t: o.linear_token_logprobs(h, w, t, return_entropy=True)),
        ("kl_penalty", "kl", "kl_penalty_fwd", ppo_in, lambda o, lp, old, a, m: o.kl_penalty(lp, old, "k3")),
        ("clipped_surrogate", "ppo", "ppo_token_fwd", ppo_in,
         lambda o, lp, old, a, m: o.clipped_surrogate(lp, old, a, m, dual_clip=3.0)[0]),
        ("value_loss", "ppo", "value_loss_fwd", ppo_in, lambda o, v, old, r, m: o.value_loss(v, old, r, m, clip=0.2)[0]),
        ("gae", "gae", "gae_fwd", gae_in, lambda o, r, v, m: o.gae(r, v, m)),
        ("linear_ppo_loss", "linear_ppo", "linear_ppo_fwd", lppo_in,
         lambda o, h, w, t, old, a: o.linear_ppo_loss(h, w, t, old, a, kl_coef=0.0, entropy_coef=0.01)[0]),
    ]


def _flat(out):
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in _flat(o)]
    return [out]


def _run(torch, fn: Callable, inputs, to64: bool):
    leaves = [x.detach().double() if to64 and x.is_floating_point() else x.detach().clone() for x in inputs]
    for x in leaves:
        if x.is_floating_point():
            x.requires_grad_(True)
    outs = _flat(fn(*leaves))
    grads_wanted = [x for x in leaves if x.requires_grad]
    diff = [o for o in outs if o.requires_grad]
    grads = []
    if diff:
        total = sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64, device=o.device)
                     .reshape(o.shape)).sum() for o in diff)
        grads = [g for g in torch.autograd.grad(total, grads_wanted, allow_unused=True) if g is not None]
    return [o.detach() for o in outs], grads


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signal tour", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-interpret", action="store_true", help="don't run Triton in the interpreter on CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)

    import warnings

    import torch

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.no_interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from rich.console import Console
    from rich.table import Table

    from . import ops
    from . import reference as ref

    table = Table(title=f"signal tour — every op on every backend ({device})")
    for col in ("op", "backend", "max rel err (values)", "max rel err (grads)", "fwd+bwd ms", "status"):
        table.add_column(col)
    torch.manual_seed(0)
    worst = 0.0
    for name, family, kernel, make, call in _cases(torch, device):
        inputs = make()
        truth_out, truth_grads = _run(torch, lambda *x: call(ref, *x), inputs, to64=True)
        for backend in ("triton", "native", "reference"):
            if backend not in ops.available_backends(kernel, device):
                table.add_row(name, backend, "", "", "", "[dim]not available here[/dim]")
                continue
            try:
                with ops.use_backend(backend):
                    _run(torch, lambda *x: call(ops, *x), inputs, to64=False)  # warm-up / JIT
                    t0 = time.perf_counter()
                    outs, grads = _run(torch, lambda *x: call(ops, *x), inputs, to64=False)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) * 1e3
            except Exception as exc:  # a tour reports, it does not stop
                table.add_row(name, backend, "", "", "", f"[red]error: {type(exc).__name__}: {str(exc)[:80]}[/red]")
                continue
            ev = max((_rel(o, t) for o, t in zip(outs, truth_out)), default=0.0)
            eg = max((_rel(g, t) for g, t in zip(grads, truth_grads)), default=0.0)
            worst = max(worst, ev, eg)
            label = backend + (" (interpreter)" if backend == "triton" and device == "cpu" else "")
            ok = "[green]ok[/green]" if max(ev, eg) < 1e-4 else "[yellow]check[/yellow]"
            table.add_row(name, label, f"{ev:.1e}", f"{eg:.1e}" if grads else "—", f"{ms:.1f}", ok)
    Console(width=max(Console().width, 150)).print(table)
    return 0 if worst < 1e-4 else 1

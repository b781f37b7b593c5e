"""Every loss of :mod:`signalrl.losses`, end to end on a tiny Llama model.

One case per registered loss: the batch is generated from the loss's own batch specification
(``LossSpec.batch``), the model is a randomly initialised ``transformers.LlamaForCausalLM`` (with a
value / reward head and a frozen reference copy when the loss needs them), and the timed call is
``spec(policy, batch)`` — model forward, log-probs, loss, metrics (one host sync) — then backward
into every parameter. Providers are the op layer's backends forced for the whole call
(``reference``, ``native``, ``triton``); an op without a kernel in the forced backend runs its
reference, as it would in training; a loss that runs no Signal kernel at all in a backend (``reward_modeling``: a
reward head on the model's last hidden state) has no row for it, which would time the reference again. No traffic
model: these rows report time and memory only.
"""

from __future__ import annotations

import copy
import importlib

import torch

from .. import providers as P
from . import Case, Preset

IDS_HINTS = ("ids", "labels")


def _model_config(preset: Preset):
    if preset.quick:
        return dict(V=256, H=32, layers=1, heads=2, B=2, T=32)
    if preset.name == "cpu":
        return dict(V=1024, H=64, layers=2, heads=4, B=2, T=64)
    return dict(V=32000, H=512, layers=2, heads=8, B=8, T=512)


def _sizes(cfg) -> dict[str, int]:
    T = cfg["T"]
    return {"B": cfg["B"], "T": T, "Tc": T, "Tr": T - T // 8, "P": T // 4, "S": 4, "L": T // 4}


def _tensor_for(field, sizes, V, device, gen):
    pat = field.patterns()[0]
    shape = tuple(sizes.get(s, 4) if isinstance(s, str) else int(s) for s in pat)
    if field.kind == "int":
        if any(h in field.key for h in IDS_HINTS):
            return torch.randint(0, V, shape, generator=gen, device=device)
        if "length" in field.key:
            return torch.full(shape, 2, dtype=torch.int64, device=device)
        return torch.randint(0, 2, shape, generator=gen, device=device)
    if field.kind == "mask":
        return torch.ones(shape, device=device)
    x = torch.randn(shape, generator=gen, device=device)
    if "log_prob" in field.key:
        return -x.abs() - 1.0
    return x


def _maker(spec, cfg):
    def make(device, gen):
        import transformers

        from signalrl.losses import PolicyModel, RewardHead, ValueHead

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            config = transformers.LlamaConfig(
                vocab_size=cfg["V"], hidden_size=cfg["H"], num_hidden_layers=cfg["layers"],
                num_attention_heads=cfg["heads"], intermediate_size=2 * cfg["H"],
                max_position_embeddings=max(2048, 2 * cfg["T"]),
            )
            model = transformers.LlamaForCausalLM(config).to(device)
            ref = copy.deepcopy(model).requires_grad_(False) if spec.uses_reference else None
            policy = PolicyModel(
                model, reference_model=ref,
                value_head=ValueHead(cfg["H"]).to(device) if spec.needs_value_head else None,
                reward_head=RewardHead(cfg["H"]).to(device) if spec.needs_reward_head else None,
            )
        sizes = _sizes(cfg)
        batch = {f.key: _tensor_for(f, sizes, cfg["V"], device, gen) for f in spec.batch if f.required}
        return {"policy": policy, **batch}

    return make


def _signal_kernels(fn, x: dict, params: list, ctx) -> set[str]:
    """The Signal kernel ops (``signalrl::*``, not the op layer's value-check helpers, which run on every backend) one
    step of ``fn`` runs in ``ctx``, forward and backward (no ``.grad`` is touched)."""
    from signalrl.ops._library import kernels_run

    with ctx:
        return kernels_run(lambda: torch.autograd.grad(fn(**x), params, allow_unused=True))


def _impl_factory(spec, backend: str):
    def factory(device, x):
        ops = importlib.import_module("signalrl.ops")
        be = importlib.import_module("signalrl.ops._backend")
        if backend == "native" and not be.native_usable(device):
            raise P.Unavailable("the native extension is not usable on this device")
        if backend == "triton" and not be.triton_usable(device):
            raise P.Unavailable("no CUDA device (the Triton interpreter is for smoke runs only: --triton-interpret)")
        policy = x["policy"]
        params = [p for p in policy.parameters() if p.requires_grad]

        def fn(policy, **batch):
            return spec(policy, batch).loss

        if backend != "reference" and not _signal_kernels(fn, x, params, ops.use_backend(backend)):
            raise P.Unavailable(f"this loss runs no Signal kernel: its {backend} row would time the reference again")

        interp = backend == "triton" and device.type != "cuda"
        note = "triton interpreter: not a performance figure" if interp else ""
        return P.Impl(fn, ctx=lambda: ops.use_backend(backend), note=note, wrt=params, smoke=interp)

    return factory


def cases(preset: Preset) -> list[Case]:
    try:
        losses = importlib.import_module("signalrl.losses")
        importlib.import_module("transformers")
        names = losses.list_losses()
    except Exception as exc:  # noqa: BLE001 - report, never crash the suite
        why = f"signalrl.losses is not available ({type(exc).__name__}: {exc})"

        def unavailable(device, x, _why=why):
            raise P.Unavailable(_why)

        return [Case(op="loss:*", family="losses", params={}, dtype=torch.float32, make=lambda d, g: {},
                     impls={"reference": unavailable}, modes=("full",), bytes_model=False)]
    cfg = _model_config(preset)
    out = []
    for name in names:
        spec = losses.get_loss(name)
        backends = ("reference", "native") if preset.quick else ("reference", "native", "triton")
        impls = {b: _impl_factory(spec, b) for b in backends}
        out.append(Case(op=f"loss:{name}", family="losses",
                        params={"B": cfg["B"], "T": cfg["T"], "H": cfg["H"], "V": cfg["V"]},
                        dtype=torch.float32, make=_maker(spec, cfg), impls=impls, bytes_model=False,
                        modes=("full",) if preset.quick else ("fwd", "bwd", "full"), headline=True,
                        paired=not preset.quick))
    return out

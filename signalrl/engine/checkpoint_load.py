"""Loading a checkpoint into a run, all or nothing: :func:`plan_load` checks a read checkpoint against the run
(weights, heads, base fingerprint, optimizer groups and state, scheduler, RNG) without changing it;
:func:`apply_load` then applies it. See :mod:`signalrl.engine.checkpoint` for the format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import read_checkpoint
from .checkpoint_codec import (OPTIMIZER_JSON, OPTIMIZER_TENSORS, RNG_TENSORS, SCHEDULER_JSON, STATE_JSON, WEIGHTS,
                               _PARAM_SHAPED, checkpoint_error, restore_rng)

@dataclass
class LoadPlan:
    """A checkpoint checked against a run: applying it cannot fail for a reason the checks could see."""
    path: str
    step: int
    new_heads: list[str]
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def _head_params(kind: str, hidden_size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of the parameters ``Run._create_head(kind)`` would add (built on the meta
    device, the generators untouched)."""
    from signalrl.losses import model as loss_model

    cls = loss_model.ValueHead if kind == "value" else loss_model.RewardHead
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        head = cls(hidden_size)
    return [(f"heads.{kind}.{n}", tuple(p.shape), p.dtype) for n, p in head.named_parameters()]


def _like(v: Any, ref: Any, *, strict_int: bool = False) -> bool:
    """``v`` (from JSON) is a value of the kind of ``ref`` (the run's own)."""
    if isinstance(ref, bool):
        return isinstance(v, bool)
    if ref is None:
        return v is None or isinstance(v, bool)
    if isinstance(ref, int) and strict_int:
        return type(v) is int
    if isinstance(ref, (int, float)):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(ref, (list, tuple)):
        return isinstance(v, (list, tuple)) and len(v) == len(ref) and all(_like(a, b) for a, b in zip(v, ref))
    if isinstance(ref, str):
        return isinstance(v, str)
    return False


def _check_optimizer(path: str, sd: dict[str, Any], optimizer: torch.optim.Optimizer,
                     groups_expected: list[list[tuple[str, tuple[int, ...], torch.dtype]]]) -> dict[str, Any]:
    def bad(fname: str, what: str) -> ValueError:
        return checkpoint_error(path, fname, what)

    groups = sd["param_groups"]
    if len(groups) != len(groups_expected):
        raise bad(OPTIMIZER_JSON, f"has {len(groups)} param groups, this run has {len(groups_expected)} "
                  "(its weights and heads)")
    defaults = optimizer.defaults
    allowed = set(defaults) | {"params", "initial_lr"}
    by_id: dict[int, tuple[str, tuple[int, ...], torch.dtype]] = {}
    out_groups = []
    for i, (g, expected) in enumerate(zip(groups, groups_expected)):
        if len(g["params"]) != len(expected):
            raise bad(OPTIMIZER_JSON, f"param group {i} has {len(g['params'])} parameters, this run's has "
                      f"{len(expected)}")
        missing, extra = sorted(set(defaults) - set(g)), sorted(set(g) - allowed)
        if missing or extra:
            raise bad(OPTIMIZER_JSON, f"param group {i} does not fit this run's {type(optimizer).__name__} "
                      f"(missing {missing}, unexpected {extra})")
        group = dict(g)
        for k, v in g.items():
            if k == "params":
                continue
            ref = defaults.get(k, 0.0)  # initial_lr: a number
            if not _like(v, ref):
                raise bad(OPTIMIZER_JSON, f"param group {i}: {k!r} is {v!r}, expected a value like {ref!r}")
            if isinstance(ref, tuple):
                group[k] = tuple(v)
        if group["lr"] < 0:
            raise bad(OPTIMIZER_JSON, f"param group {i}: 'lr' is {group['lr']!r}, expected >= 0")
        out_groups.append(group)
        by_id.update(zip(g["params"], expected))
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    sgd = isinstance(optimizer, torch.optim.SGD)
    group_of = {pid: gi for gi, g in enumerate(out_groups) for pid in g["params"]}
    for pid, st in sd["state"].items():
        name, shape, dtype = by_id[pid]
        where = f"optimizer state of {name} (param {pid})"
        if adam:
            need = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if out_groups[group_of[pid]]["amsgrad"]
                                                        else set())
            if not need <= set(st):
                raise bad(OPTIMIZER_JSON, f"{where} lacks {sorted(need - set(st))}")
        if sgd and not set(st) <= {"momentum_buffer"}:
            raise bad(OPTIMIZER_JSON, f"{where} has unexpected keys {sorted(set(st) - {'momentum_buffer'})}")
        for k, v in st.items():
            if k in _PARAM_SHAPED and v is not None:
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape or v.dtype != dtype:
                    got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)
                    raise bad(OPTIMIZER_TENSORS, f"{where}: {k!r} is {got}, expected {dtype} {shape}")
            elif k == "step":
                ok = (isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() and float(v) >= 0) or \
                    (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)
                if not ok:
                    raise bad(OPTIMIZER_TENSORS if isinstance(v, torch.Tensor) else OPTIMIZER_JSON,
                              f"{where}: 'step' must be a number >= 0 (or a 0-d float tensor), got {v!r:.60}")
    return {"state": sd["state"], "param_groups": out_groups}


def _check_scheduler(path: str, sd: Any, scheduler: Any, n_groups: int) -> dict[str, Any]:
    if not isinstance(sd, dict):
        raise checkpoint_error(path, SCHEDULER_JSON, f"must be the scheduler's state (a JSON object), got "
                     f"{type(sd).__name__}")
    own = scheduler.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise checkpoint_error(path, SCHEDULER_JSON, f"does not fit this run's {type(scheduler).__name__} (missing "
                     f"{missing}, unexpected {extra})")
    for k, v in sd.items():
        ref = own[k]
        if k in ("base_lrs", "_last_lr"):
            ok = isinstance(v, list) and (len(v) == n_groups if k == "base_lrs" else 1 <= len(v) <= n_groups) \
                and all(_like(x, 0.0) and x >= 0 for x in v)
            expected = f"a list of {n_groups} learning rates"
        elif k == "lr_lambdas":
            ok = isinstance(v, list) and len(v) == n_groups and all(x is None for x in v)
            expected = f"a list of {n_groups} nulls"
        else:
            ok = _like(v, ref, strict_int=True)
            expected = f"a value like {ref!r}"
        if not ok:
            raise checkpoint_error(path, SCHEDULER_JSON, f"{k!r} is {v!r:.80}, expected {expected}")
    if type(sd.get("last_epoch", 0)) is int and sd.get("last_epoch", 0) < 0:
        raise checkpoint_error(path, SCHEDULER_JSON, f"'last_epoch' must be >= 0, got {sd['last_epoch']}")
    return sd


def _check_rng(path: str, rng: dict[str, Any], sampling_generator: torch.Generator | None) -> None:
    if sampling_generator is not None:
        if "sampling" not in rng:
            raise checkpoint_error(path, RNG_TENSORS, "has no 'sampling' generator state")
        try:
            torch.Generator(device=sampling_generator.device).set_state(rng["sampling"])
        except Exception as exc:
            raise checkpoint_error(path, RNG_TENSORS, f"has an invalid 'sampling' state for a {sampling_generator.device} "
                         f"generator ({exc})") from exc
    if rng["cuda"] and torch.cuda.is_available():
        for i, s in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            if s.numel() != torch.cuda.get_rng_state(i).numel():
                raise checkpoint_error(path, RNG_TENSORS, f"'cuda.{i}' has {s.numel()} bytes, a CUDA generator state has "
                             f"{torch.cuda.get_rng_state(i).numel()}")


def plan_load(run: Any, path: str) -> LoadPlan:
    """Read the checkpoint at ``path`` and check it against ``run``; the run is not changed."""
    ckpt = read_checkpoint(path, run.device)
    path, state = ckpt["path"], ckpt["state"]
    from .config import HEADS

    heads = state.get("heads")
    if not isinstance(heads, list) or not set(heads) <= set(HEADS):
        raise checkpoint_error(path, STATE_JSON, f"'heads' must list head kinds among {list(HEADS)}, got {heads!r}")
    if list(run.heads) != heads[:len(run.heads)]:
        raise ValueError(f"checkpoint {path!r} has heads {heads}, this run has {list(run.heads)} "
                         "(created in a different order)")
    new_heads = heads[len(run.heads):]

    # Every trainable tensor the run will have once the checkpoint's heads exist, grouped as the optimizer is.
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
    names = {id(p): n for n, p in run.trainable_parameters()}
    for g in run.optimizer.param_groups:
        groups.append([(names.get(id(p), "?"), tuple(p.shape), p.dtype) for p in g["params"]])
    for kind in new_heads:
        groups.append(_head_params(kind, run.hidden_size))
    expected = {n: (shape, dtype) for g in groups for n, shape, dtype in g}

    tensors = ckpt["tensors"]
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors))[:5], sorted(set(tensors) - set(expected))[:5]
        raise ValueError(f"checkpoint {path!r}: {WEIGHTS} does not match this run's trainable weights "
                         f"(missing {missing}, unexpected {extra}); was it saved by a run with the same "
                         "base model and LoRA settings?")
    saved_fp = state.get("frozen_fingerprint")
    if not isinstance(saved_fp, str):
        raise checkpoint_error(path, STATE_JSON, f"'frozen_fingerprint' must be a str, got {saved_fp!r}")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    if saved_fp != run.frozen_fingerprint():
        raise ValueError(f"checkpoint {path!r} was saved on different frozen base weights than this run's "
                         f"(base_model {config.get('base_model')!r}, seed {config.get('seed')}); create the run "
                         "with the same base_model and seed")
    for n, (shape, dtype) in expected.items():
        t = tensors[n]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise checkpoint_error(path, WEIGHTS, f"tensor {n} is {t.dtype} {tuple(t.shape)}, this run's is {dtype} {shape}")
    optimizer = _check_optimizer(path, ckpt["optimizer"], run.optimizer, groups)
    scheduler = _check_scheduler(path, ckpt["scheduler"], run.scheduler, len(groups))
    _check_rng(path, ckpt["rng"], run.sampling_generator)
    return LoadPlan(path=path, step=state["step"], new_heads=new_heads, tensors=tensors, optimizer=optimizer,
                    scheduler=scheduler, rng=ckpt["rng"])


def apply_load(run: Any, plan: LoadPlan) -> None:
    """Apply a checked plan: heads, weights, optimizer, scheduler, generators (the caller sets the step and
    clears the gradients)."""
    from .config import _lr_lambda

    created = []
    try:
        for kind in plan.new_heads:
            run._create_head(kind)
            created.append(kind)
    except BaseException:
        for kind in created:
            run._drop_head(kind)
        raise
    with torch.no_grad():
        for n, p in run.trainable_parameters():
            p.copy_(plan.tensors[n])
    run.optimizer.load_state_dict(plan.optimizer)
    run.scheduler.load_state_dict(dict(plan.scheduler))
    run.scheduler.lr_lambdas = [_lr_lambda(run.config)] * len(run.optimizer.param_groups)
    restore_rng(plan.rng, run.sampling_generator)

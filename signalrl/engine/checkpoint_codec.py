"""The checkpoint format's file names and the pickle-free encodings of optimizer and RNG state.

An optimizer ``state_dict()`` becomes safetensors (every tensor, under ``state.<param id>.<key>``) plus JSON
(param groups, and per param id which keys are tensors and which are JSON scalars); the RNG states become uint8
tensors (torch CPU, CUDA, the sampling generator) plus JSON lists (Python's ``random``, NumPy). Decoding checks
structure and types and raises :func:`checkpoint_error` naming the file. See :mod:`signalrl.engine.checkpoint`.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 2
WEIGHTS = "weights.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"
STATE_JSON = "state.json"
FILES = (WEIGHTS, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON, RNG_TENSORS, RNG_JSON, STATE_JSON)
LEGACY_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")  # format 1: pickles, never opened
MAX_NAME_BYTES = 200
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def checkpoint_error(path: str, fname: str, what: str) -> ValueError:
    return ValueError(f"checkpoint {path!r}: {fname} {what}")


def capture_rng(sampling_generator: torch.Generator | None) -> dict[str, Any]:
    """Every generator a run draws from: torch CPU (and CUDA), Python, NumPy, and the run's sampling one."""
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sampling_generator is not None:
        state["sampling"] = sampling_generator.get_state()
    return state


def restore_rng(state: dict[str, Any], sampling_generator: torch.Generator | None) -> None:
    """Set the generators from a state returned by :func:`capture_rng` or read by :func:`read_checkpoint`."""
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if sampling_generator is not None and "sampling" in state:
        sampling_generator.set_state(state["sampling"])


def encode_rng(rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": rng["torch"]}
    for i, s in enumerate(rng.get("cuda") or []):
        tensors[f"cuda.{i}"] = s
    if "sampling" in rng:
        tensors["sampling"] = rng["sampling"]
    version, internal, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    meta = {"python": [int(version), [int(x) for x in internal], gauss],
            "numpy": [str(name), [int(x) for x in np.asarray(keys).tolist()], int(pos), int(has_gauss),
                      float(cached)]}
    return tensors, meta


def decode_rng(path: str, meta: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if not isinstance(meta, dict) or set(meta) != {"python", "numpy"}:
        raise checkpoint_error(path, RNG_JSON, f"must be an object with keys 'python' and 'numpy', got "
                     f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    try:
        version, internal, gauss = meta["python"]
        python = (version, tuple(internal), gauss)
        if not all(type(x) is int for x in (version, *internal)) or not (gauss is None or isinstance(gauss, float)):
            raise ValueError("expected [int, [int, ...], float or null]")
        random.Random().setstate(python)  # validates on a scratch generator
    except Exception as exc:
        raise checkpoint_error(path, RNG_JSON, f"has an invalid 'python' random state ({type(exc).__name__}: {exc})") from exc
    try:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        if not (isinstance(name, str) and isinstance(keys, list) and all(type(x) is int for x in (*keys, pos,
                                                                                                   has_gauss))
                and isinstance(cached, (int, float)) and not isinstance(cached, bool)):
            raise ValueError("expected [str, [int, ...], int, int, float]")
        numpy = (name, np.array(keys, dtype=np.uint32), pos, has_gauss, float(cached))
        np.random.RandomState().set_state(numpy)  # validates on a scratch generator
    except Exception as exc:
        raise checkpoint_error(path, RNG_JSON, f"has an invalid 'numpy' random state ({type(exc).__name__}: {exc})") from exc
    n_cuda = sum(k.startswith("cuda.") for k in tensors)
    expected = {"torch", *(f"cuda.{i}" for i in range(n_cuda))}
    unexpected = sorted(set(tensors) - expected - {"sampling"})
    if "torch" not in tensors or unexpected:
        raise checkpoint_error(path, RNG_TENSORS, f"must hold 'torch' (and optionally 'sampling', 'cuda.0', ...); "
                     f"got {sorted(tensors)}")
    for k, t in tensors.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise checkpoint_error(path, RNG_TENSORS, f"{k!r} must be a 1-D uint8 generator state, got {t.dtype} "
                         f"{tuple(t.shape)}")
    try:
        torch.Generator().set_state(tensors["torch"])  # validates on a scratch generator
    except Exception as exc:
        raise checkpoint_error(path, RNG_TENSORS, f"has an invalid 'torch' state ({exc})") from exc
    out = {"torch": tensors["torch"], "python": python, "numpy": numpy,
           "cuda": [tensors[f"cuda.{i}"] for i in range(n_cuda)]}
    if "sampling" in tensors:
        out["sampling"] = tensors["sampling"]
    return out


# ---------------------------------------------------------------------------------------------- optimizer
def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def encode_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        entry: dict[str, Any] = {"tensors": {}, "values": {}}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                name = f"state.{pid}.{k}"
                tensors[name] = v.detach().to("cpu").contiguous()
                entry["tensors"][k] = name
            elif _is_scalar(v):
                entry["values"][k] = v
            else:
                raise TypeError(f"optimizer state of param {pid}: {k!r} is a {type(v).__name__}, which a "
                                "checkpoint cannot store (tensors and JSON scalars only)")
        state[str(pid)] = entry
    groups = []
    for i, g in enumerate(sd["param_groups"]):
        out = {}
        for k, v in g.items():
            if isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v):
                out[k] = list(v)
            elif _is_scalar(v):
                out[k] = v
            else:
                raise TypeError(f"optimizer param group {i}: {k!r} is a {type(v).__name__}, which a checkpoint "
                                "cannot store")
        groups.append(out)
    return tensors, {"param_groups": groups, "state": state}


def decode_optimizer(path: str, meta: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    def bad(what: str) -> ValueError:
        return checkpoint_error(path, OPTIMIZER_JSON, what)

    if not isinstance(meta, dict) or set(meta) != {"param_groups", "state"}:
        raise bad(f"must be an object with keys 'param_groups' and 'state', got "
                  f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    groups, state = meta["param_groups"], meta["state"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("'param_groups' must be a list of objects")
    ids: list[int] = []
    for i, g in enumerate(groups):
        params = g.get("params")
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise bad(f"param group {i}: 'params' must be a list of ints, got {params!r:.80}")
        ids += params
    if len(set(ids)) != len(ids):
        raise bad("param groups list a parameter id twice")
    if not isinstance(state, dict):
        raise bad("'state' must be an object")
    used = set()
    out_state: dict[int, dict[str, Any]] = {}
    for key, entry in state.items():
        if not key.isdigit() or int(key) not in ids:
            raise bad(f"state for {key!r}, which is no parameter id of the param groups")
        if not isinstance(entry, dict) or set(entry) != {"tensors", "values"} \
                or not isinstance(entry["tensors"], dict) or not isinstance(entry["values"], dict):
            raise bad(f"state of param {key}: expected {{'tensors': {{...}}, 'values': {{...}}}}")
        st: dict[str, Any] = {}
        for k, v in entry["values"].items():
            if not _is_scalar(v):
                raise bad(f"state of param {key}: {k!r} must be a JSON scalar")
            st[k] = v
        for k, name in entry["tensors"].items():
            if not isinstance(name, str) or name not in tensors:
                raise checkpoint_error(path, OPTIMIZER_TENSORS, f"has no tensor {name!r} (state {k!r} of param {key})")
            st[k] = tensors[name]
            used.add(name)
        out_state[int(key)] = st
    if set(tensors) - used:
        raise checkpoint_error(path, OPTIMIZER_TENSORS, f"has tensors {sorted(set(tensors) - used)[:5]} that "
                     f"{OPTIMIZER_JSON} does not mention")
    bad_tensors = non_finite(tensors)
    if bad_tensors:
        raise checkpoint_error(path, OPTIMIZER_TENSORS, f"has non-finite values (NaN/inf) in {bad_tensors[:5]}")
    return {"state": out_state, "param_groups": groups}


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    names = [n for n, t in tensors.items() if t.is_floating_point() or t.is_complex()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[n]).all().to("cpu") for n in names]).tolist()
    return [n for n, good in zip(names, ok) if not good]

"""Checkpoints of a run: an atomic, pickle-free format, and an all-or-nothing load.

**Format** (``format_version`` 2). A checkpoint is a directory of seven files — tensors in safetensors,
structure and scalars in JSON; nothing is ever pickled or unpickled:

- ``weights.safetensors``: every trainable tensor of the run — the LoRA adapters (or all weights for full
  fine-tuning) under their ``named_parameters`` names, and the heads under ``heads.<kind>.*``;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's ``state_dict()`` — its tensors (``exp_avg``,
  ``momentum_buffer``, the step counters, …) under ``state.<param id>.<key>``, and the param groups plus,
  per param id, which keys are tensors (and under which name) and which are JSON scalars;
- ``scheduler.json``: the scheduler's ``state_dict()`` (numbers and lists only);
- ``rng.safetensors`` + ``rng.json``: the torch CPU, CUDA and sampling generator states (uint8 tensors), and
  Python's ``random`` and NumPy's states (tuples of ints, as JSON lists);
- ``state.json``: ``format_version``, ``step``, ``heads`` (in creation order), ``lora``, the run config and
  a fingerprint of the frozen base weights.

Checkpoints of format 1 (``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: pickles, which run code when loaded)
are refused with a message saying so; their ``.pt`` files are never opened.

**Atomic replacement.** In ``<run_dir>/checkpoints/``, a checkpoint name is a *symlink* to a version
directory ``.v-<12 hex>`` beside it. ``save`` writes and fsyncs every file into a fresh version directory,
creates a symlink ``.link-<12 hex>`` to it and renames that symlink over the name with ``os.replace`` —
one atomic ``rename(2)`` of a non-directory, which POSIX allows to replace an existing symlink. Whenever
the process dies, the name is therefore the previous checkpoint or the new one, never missing and never
half-written. Leftovers of an interrupted save (``.v-*`` directories no name points to, ``.link-*``) — and
the ``.tmp-*`` / ``.old-*`` directories of format 1's two-rename scheme (an ``.old-<name>-<id>`` whose name
is missing is renamed back, as it is then the only copy) — are removed by :func:`clean_leftovers`, which
runs when a run is opened and at every save. A run directory belongs to one process at a time. Temporary
names are short and never contain the checkpoint name, so any valid name (≤ 200 UTF-8 bytes) fits.
Copy a checkpoint with ``cp -rL`` (or ``shutil.copytree(os.path.realpath(path), dst)``).

**Loading.** :func:`read_checkpoint` parses and checks every file (decodable, complete, consistent,
finite); :func:`plan_load` checks it against a run (names, shapes and dtypes of the weights, heads, base
fingerprint, optimizer groups and per-parameter state, scheduler and RNG states) without changing the run;
:func:`apply_load` then applies it. Any problem raises one ``ValueError`` naming the file and what is wrong,
before anything of the run was touched.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

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

_VERSION = ".v-"
_LINK = ".link-"
_LEGACY_OLD = re.compile(r"^\.old-(.+)-[0-9a-f]{8}$")
# Optimizer state keys holding one value per element of their parameter (AdamW, Adam, SGD).
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


# ---------------------------------------------------------------------------------------------- names
def validate_name(name: Any, arg: str = "name") -> str:
    """A checkpoint name: a non-empty ``str`` of at most 200 UTF-8 bytes, without ``/``, ``\\``, NUL or a
    leading ``.``."""
    if not isinstance(name, str):
        raise TypeError(f"{arg}: expected a checkpoint name (str), got {type(name).__name__}")
    if not name:
        raise ValueError(f"{arg}: expected a non-empty checkpoint name, got ''")
    if "\0" in name:
        raise ValueError(f"{arg}: a checkpoint name cannot contain a NUL byte, got {name!r}")
    if "/" in name or "\\" in name:
        raise ValueError(f"{arg}: a checkpoint name cannot contain '/' or '\\', got {name!r}")
    if name.startswith("."):
        raise ValueError(f"{arg}: a checkpoint name cannot start with '.', got {name!r} "
                         "(to load a directory by path, write it as './dir' or an absolute path)")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{arg}: a checkpoint name is at most {MAX_NAME_BYTES} bytes (UTF-8), got {size} "
                         f"({name[:40]!r}...)")
    return name


def resolve(checkpoints_dir: str, name_or_path: Any) -> str:
    """The directory ``load_state(name_or_path)`` reads.

    A ``str`` without a path separator is always a checkpoint *name* of this run: ``<checkpoints_dir>/<name>``
    (never a directory of the current working directory). A ``str`` with a separator (``./ck``, ``../x/ck``,
    ``/abs/ck``) or an ``os.PathLike`` is a *path*, relative to the current directory."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
        if not isinstance(name_or_path, str):
            raise TypeError(f"name_or_path: expected a str path, got {type(name_or_path).__name__}")
        is_path = True
    elif isinstance(name_or_path, str):
        is_path = "/" in name_or_path or os.sep in name_or_path or bool(os.altsep and os.altsep in name_or_path)
    else:
        raise TypeError(f"name_or_path: expected a checkpoint name or a path (str or os.PathLike), got "
                        f"{type(name_or_path).__name__}")
    if is_path:
        if "\0" in name_or_path:
            raise ValueError(f"name_or_path: a path cannot contain a NUL byte, got {name_or_path!r}")
        path = os.path.abspath(name_or_path)
    else:
        path = os.path.join(checkpoints_dir, validate_name(name_or_path, "name_or_path"))
    if not os.path.isdir(path):
        kind = "directory" if is_path else "checkpoint of this run"
        raise ValueError(f"name_or_path: no checkpoint {name_or_path!r} (looked for the {kind} {path!r})")
    return path


# ---------------------------------------------------------------------------------------------- files
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def clean_leftovers(checkpoints_dir: str) -> list[str]:
    """Remove what interrupted saves left in ``checkpoints_dir``: version directories no checkpoint name
    points to, ``.link-*`` symlinks, format 1's ``.tmp-*`` directories, and its ``.old-<name>-<id>``
    directories (renamed back to ``<name>`` when that name is missing). Best effort; returns the entries
    removed or restored."""
    try:
        entries = os.listdir(checkpoints_dir)
    except OSError:
        return []
    referenced = set()
    for e in entries:
        p = os.path.join(checkpoints_dir, e)
        if not e.startswith(".") and os.path.islink(p):
            try:
                target = os.readlink(p)
            except OSError:
                continue
            if target.startswith(_VERSION) and os.sep not in target:
                referenced.add(target)
    done = []
    for e in sorted(entries):
        p = os.path.join(checkpoints_dir, e)
        legacy_old = _LEGACY_OLD.match(e)
        if legacy_old and not os.path.lexists(os.path.join(checkpoints_dir, legacy_old.group(1))):
            try:  # format 1 died between its two renames: this is the only copy of the checkpoint
                os.rename(p, os.path.join(checkpoints_dir, legacy_old.group(1)))
                done.append(e)
            except OSError:
                pass
        elif (e.startswith(_VERSION) and e not in referenced) or e.startswith((_LINK, ".tmp-")) or legacy_old:
            _remove(p)
            done.append(e)
    return done


def _read_json(path: str, fname: str, src: str | None = None) -> Any:
    """``fname`` of the checkpoint directory ``src`` (``path``, as the user named it, for messages)."""
    try:
        with open(os.path.join(src or path, fname), encoding="utf-8") as f:
            return json.load(f)
    except Exception as exc:  # any decoding problem becomes one clear error
        raise _error(path, fname, f"is not readable JSON ({type(exc).__name__}: {exc})") from exc


def _read_tensors(path: str, fname: str, device: Any, src: str | None = None) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(os.path.join(src or path, fname), framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                out[k] = f.get_tensor(k)
        return out
    except Exception as exc:  # SafetensorError, OSError, ...: one clear error
        raise _error(path, fname, f"is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def _error(path: str, fname: str, what: str) -> ValueError:
    return ValueError(f"checkpoint {path!r}: {fname} {what}")


# ---------------------------------------------------------------------------------------------- RNG
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


def _encode_rng(rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _decode_rng(path: str, meta: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if not isinstance(meta, dict) or set(meta) != {"python", "numpy"}:
        raise _error(path, RNG_JSON, f"must be an object with keys 'python' and 'numpy', got "
                     f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    try:
        version, internal, gauss = meta["python"]
        python = (version, tuple(internal), gauss)
        if not all(type(x) is int for x in (version, *internal)) or not (gauss is None or isinstance(gauss, float)):
            raise ValueError("expected [int, [int, ...], float or null]")
        random.Random().setstate(python)  # validates on a scratch generator
    except Exception as exc:
        raise _error(path, RNG_JSON, f"has an invalid 'python' random state ({type(exc).__name__}: {exc})") from exc
    try:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        if not (isinstance(name, str) and isinstance(keys, list) and all(type(x) is int for x in (*keys, pos,
                                                                                                   has_gauss))
                and isinstance(cached, (int, float)) and not isinstance(cached, bool)):
            raise ValueError("expected [str, [int, ...], int, int, float]")
        numpy = (name, np.array(keys, dtype=np.uint32), pos, has_gauss, float(cached))
        np.random.RandomState().set_state(numpy)  # validates on a scratch generator
    except Exception as exc:
        raise _error(path, RNG_JSON, f"has an invalid 'numpy' random state ({type(exc).__name__}: {exc})") from exc
    n_cuda = sum(k.startswith("cuda.") for k in tensors)
    expected = {"torch", *(f"cuda.{i}" for i in range(n_cuda))}
    unexpected = sorted(set(tensors) - expected - {"sampling"})
    if "torch" not in tensors or unexpected:
        raise _error(path, RNG_TENSORS, f"must hold 'torch' (and optionally 'sampling', 'cuda.0', ...); "
                     f"got {sorted(tensors)}")
    for k, t in tensors.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise _error(path, RNG_TENSORS, f"{k!r} must be a 1-D uint8 generator state, got {t.dtype} "
                         f"{tuple(t.shape)}")
    try:
        torch.Generator().set_state(tensors["torch"])  # validates on a scratch generator
    except Exception as exc:
        raise _error(path, RNG_TENSORS, f"has an invalid 'torch' state ({exc})") from exc
    out = {"torch": tensors["torch"], "python": python, "numpy": numpy,
           "cuda": [tensors[f"cuda.{i}"] for i in range(n_cuda)]}
    if "sampling" in tensors:
        out["sampling"] = tensors["sampling"]
    return out


# ---------------------------------------------------------------------------------------------- optimizer
def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _encode_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _decode_optimizer(path: str, meta: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    def bad(what: str) -> ValueError:
        return _error(path, OPTIMIZER_JSON, what)

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
                raise _error(path, OPTIMIZER_TENSORS, f"has no tensor {name!r} (state {k!r} of param {key})")
            st[k] = tensors[name]
            used.add(name)
        out_state[int(key)] = st
    if set(tensors) - used:
        raise _error(path, OPTIMIZER_TENSORS, f"has tensors {sorted(set(tensors) - used)[:5]} that "
                     f"{OPTIMIZER_JSON} does not mention")
    bad_tensors = _non_finite(tensors)
    if bad_tensors:
        raise _error(path, OPTIMIZER_TENSORS, f"has non-finite values (NaN/inf) in {bad_tensors[:5]}")
    return {"state": out_state, "param_groups": groups}


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    names = [n for n, t in tensors.items() if t.is_floating_point() or t.is_complex()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[n]).all().to("cpu") for n in names]).tolist()
    return [n for n, good in zip(names, ok) if not good]


# ---------------------------------------------------------------------------------------------- write
def write_checkpoint(path: str, *, tensors: dict[str, torch.Tensor], optimizer: dict, scheduler: dict | None,
                     rng: dict, state: dict[str, Any]) -> str:
    """Write a checkpoint named ``basename(path)`` in ``dirname(path)``, atomically replacing one of that name.

    ``optimizer`` and ``scheduler`` are ``state_dict()``s, ``rng`` is :func:`capture_rng`'s result. Everything
    is encoded before the disk is touched (an unstorable value raises ``TypeError``); see the module docstring
    for the layout and the guarantee."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    validate_name(name)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(path) and not os.path.islink(path):
        raise ValueError(f"name: {path!r} exists and is not a checkpoint of format {FORMAT_VERSION} (an older "
                         "checkpoint or another file); it is left as it is: remove it or choose another name")
    # Encode first: nothing below can fail for a reason other than the disk.
    files: dict[str, Any] = {}
    files[WEIGHTS] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    files[OPTIMIZER_TENSORS], opt_meta = _encode_optimizer(optimizer)
    files[RNG_TENSORS], rng_meta = _encode_rng(rng)
    files[OPTIMIZER_JSON] = json.dumps(opt_meta)
    files[SCHEDULER_JSON] = json.dumps(scheduler)
    files[RNG_JSON] = json.dumps(rng_meta)
    files[STATE_JSON] = json.dumps({"format_version": FORMAT_VERSION, **state}, indent=2, default=str)

    clean_leftovers(parent)
    vid = uuid.uuid4().hex[:12]
    version = os.path.join(parent, _VERSION + vid)
    link = os.path.join(parent, _LINK + vid)
    os.mkdir(version)
    try:
        for fname in FILES:
            fpath = os.path.join(version, fname)
            if fname.endswith(".safetensors"):
                save_file(files[fname], fpath)
            else:
                with open(fpath, "w", encoding="utf-8") as f:
                    f.write(files[fname])
            _fsync_file(fpath)
        _fsync_dir(version)
        os.symlink(_VERSION + vid, link)
        os.replace(link, path)  # the atomic step: the name now means the new version
    except BaseException:
        _remove(link)
        _remove(version)
        raise
    _fsync_dir(parent)
    clean_leftovers(parent)  # the previous version, now unreferenced
    return path


# ---------------------------------------------------------------------------------------------- read
def read_checkpoint(path: str, device: Any = "cpu") -> dict[str, Any]:
    """Read and check every file of the checkpoint at ``path`` (a name symlink or a version directory).

    Returns ``{"path", "tensors", "optimizer", "scheduler", "rng", "state"}`` (weights on ``device``; the
    optimizer's tensors on the CPU, where ``Optimizer.load_state_dict`` expects its step counters). Raises
    ``ValueError`` naming the file for anything unreadable, incomplete, inconsistent or non-finite, and for
    format 1 checkpoints (pickles: refused unread)."""
    path = os.path.abspath(path)  # for messages: the checkpoint as the caller named it
    src = os.path.realpath(path)  # read from one version, even if the name is replaced meanwhile
    if not os.path.isdir(src):
        raise ValueError(f"checkpoint {path!r} is not a directory")
    legacy = [f for f in LEGACY_FILES if os.path.lexists(os.path.join(src, f))]
    state = None
    if os.path.isfile(os.path.join(src, STATE_JSON)):
        state = _read_json(path, STATE_JSON, src)
    version = state.get("format_version") if isinstance(state, dict) else None
    if legacy or version == 1:
        raise ValueError(f"checkpoint {path!r} has format_version 1 ({', '.join(legacy) or 'pickled .pt files'}: "
                         "pickles, which can run arbitrary code when loaded). This version reads only format "
                         f"{FORMAT_VERSION} and never unpickles; load it with the signalrl version that wrote it "
                         "and save it again with this one only if you trust its origin")
    missing = [n for n in FILES if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise ValueError(f"checkpoint {path!r} is incomplete or not a checkpoint: missing {missing}")
    if not isinstance(state, dict):
        raise _error(path, STATE_JSON, f"must be a JSON object, got {type(state).__name__}")
    if version != FORMAT_VERSION:
        raise _error(path, STATE_JSON, f"has format_version {version!r}; this version reads {FORMAT_VERSION}")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise _error(path, STATE_JSON, f"'step' must be an int >= 0, got {step!r}")
    heads = state.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads) or len(set(heads)) != len(heads):
        raise _error(path, STATE_JSON, f"'heads' must be a list of distinct names, got {heads!r}")

    tensors = _read_tensors(path, WEIGHTS, device, src)
    non_finite = _non_finite(tensors)
    if non_finite:
        raise _error(path, WEIGHTS, f"has non-finite values (NaN/inf) in tensor(s) {non_finite[:5]}"
                     f"{' and more' if len(non_finite) > 5 else ''}")
    optimizer = _decode_optimizer(path, _read_json(path, OPTIMIZER_JSON, src),
                                  _read_tensors(path, OPTIMIZER_TENSORS, "cpu", src))
    scheduler = _read_json(path, SCHEDULER_JSON, src)
    if scheduler is not None and not isinstance(scheduler, dict):
        raise _error(path, SCHEDULER_JSON, f"must be a JSON object (the scheduler's state), got "
                     f"{type(scheduler).__name__}")
    rng = _decode_rng(path, _read_json(path, RNG_JSON, src), _read_tensors(path, RNG_TENSORS, "cpu", src))
    return {"path": path, "tensors": tensors, "optimizer": optimizer, "scheduler": scheduler, "rng": rng,
            "state": state}


# ---------------------------------------------------------------------------------------------- load into a run
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
        return _error(path, fname, what)

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
        raise _error(path, SCHEDULER_JSON, f"must be the scheduler's state (a JSON object), got "
                     f"{type(sd).__name__}")
    own = scheduler.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise _error(path, SCHEDULER_JSON, f"does not fit this run's {type(scheduler).__name__} (missing "
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
            raise _error(path, SCHEDULER_JSON, f"{k!r} is {v!r:.80}, expected {expected}")
    if type(sd.get("last_epoch", 0)) is int and sd.get("last_epoch", 0) < 0:
        raise _error(path, SCHEDULER_JSON, f"'last_epoch' must be >= 0, got {sd['last_epoch']}")
    return sd


def _check_rng(path: str, rng: dict[str, Any], sampling_generator: torch.Generator | None) -> None:
    if sampling_generator is not None:
        if "sampling" not in rng:
            raise _error(path, RNG_TENSORS, "has no 'sampling' generator state")
        try:
            torch.Generator(device=sampling_generator.device).set_state(rng["sampling"])
        except Exception as exc:
            raise _error(path, RNG_TENSORS, f"has an invalid 'sampling' state for a {sampling_generator.device} "
                         f"generator ({exc})") from exc
    if rng["cuda"] and torch.cuda.is_available():
        for i, s in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            if s.numel() != torch.cuda.get_rng_state(i).numel():
                raise _error(path, RNG_TENSORS, f"'cuda.{i}' has {s.numel()} bytes, a CUDA generator state has "
                             f"{torch.cuda.get_rng_state(i).numel()}")


def plan_load(run: Any, path: str) -> LoadPlan:
    """Read the checkpoint at ``path`` and check it against ``run``; the run is not changed."""
    ckpt = read_checkpoint(path, run.device)
    path, state = ckpt["path"], ckpt["state"]
    from .config import HEADS

    heads = state.get("heads")
    if not isinstance(heads, list) or not set(heads) <= set(HEADS):
        raise _error(path, STATE_JSON, f"'heads' must list head kinds among {list(HEADS)}, got {heads!r}")
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
        raise _error(path, STATE_JSON, f"'frozen_fingerprint' must be a str, got {saved_fp!r}")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    if saved_fp != run.frozen_fingerprint():
        raise ValueError(f"checkpoint {path!r} was saved on different frozen base weights than this run's "
                         f"(base_model {config.get('base_model')!r}, seed {config.get('seed')}); create the run "
                         "with the same base_model and seed")
    for n, (shape, dtype) in expected.items():
        t = tensors[n]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise _error(path, WEIGHTS, f"tensor {n} is {t.dtype} {tuple(t.shape)}, this run's is {dtype} {shape}")
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

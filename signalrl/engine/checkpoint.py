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
finite); :func:`signalrl.engine.checkpoint_load.plan_load` checks it against a run (names, shapes and dtypes of the weights, heads, base
fingerprint, optimizer groups and per-parameter state, scheduler and RNG states) without changing the run;
:func:`~signalrl.engine.checkpoint_load.apply_load` then applies it. The encodings of optimizer and RNG state
are in :mod:`signalrl.engine.checkpoint_codec`. Any problem raises one ``ValueError`` naming the file and what is wrong,
before anything of the run was touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint_codec import (FILES, FORMAT_VERSION, LEGACY_FILES, MAX_NAME_BYTES, OPTIMIZER_JSON,  # noqa: F401
                               OPTIMIZER_TENSORS, RNG_JSON, RNG_TENSORS, SCHEDULER_JSON, STATE_JSON, WEIGHTS,
                               capture_rng, checkpoint_error, decode_optimizer, decode_rng, encode_optimizer,
                               encode_rng, non_finite, restore_rng)

_VERSION = ".v-"
_LINK = ".link-"
_LEGACY_OLD = re.compile(r"^\.old-(.+)-[0-9a-f]{8}$")
# Optimizer state keys holding one value per element of their parameter (AdamW, Adam, SGD).


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
        raise checkpoint_error(path, fname, f"is not readable JSON ({type(exc).__name__}: {exc})") from exc


def _read_tensors(path: str, fname: str, device: Any, src: str | None = None) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(os.path.join(src or path, fname), framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                out[k] = f.get_tensor(k)
        return out
    except Exception as exc:  # SafetensorError, OSError, ...: one clear error
        raise checkpoint_error(path, fname, f"is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


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
    files[OPTIMIZER_TENSORS], opt_meta = encode_optimizer(optimizer)
    files[RNG_TENSORS], rng_meta = encode_rng(rng)
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
        raise checkpoint_error(path, STATE_JSON, f"must be a JSON object, got {type(state).__name__}")
    if version != FORMAT_VERSION:
        raise checkpoint_error(path, STATE_JSON, f"has format_version {version!r}; this version reads {FORMAT_VERSION}")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise checkpoint_error(path, STATE_JSON, f"'step' must be an int >= 0, got {step!r}")
    heads = state.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads) or len(set(heads)) != len(heads):
        raise checkpoint_error(path, STATE_JSON, f"'heads' must be a list of distinct names, got {heads!r}")

    tensors = _read_tensors(path, WEIGHTS, device, src)
    bad = non_finite(tensors)
    if bad:
        raise checkpoint_error(path, WEIGHTS, f"has non-finite values (NaN/inf) in tensor(s) {bad[:5]}"
                               f"{' and more' if len(bad) > 5 else ''}")
    optimizer = decode_optimizer(path, _read_json(path, OPTIMIZER_JSON, src),
                                  _read_tensors(path, OPTIMIZER_TENSORS, "cpu", src))
    scheduler = _read_json(path, SCHEDULER_JSON, src)
    if scheduler is not None and not isinstance(scheduler, dict):
        raise checkpoint_error(path, SCHEDULER_JSON, f"must be a JSON object (the scheduler's state), got "
                     f"{type(scheduler).__name__}")
    rng = decode_rng(path, _read_json(path, RNG_JSON, src), _read_tensors(path, RNG_TENSORS, "cpu", src))
    return {"path": path, "tensors": tensors, "optimizer": optimizer, "scheduler": scheduler, "rng": rng,
            "state": state}

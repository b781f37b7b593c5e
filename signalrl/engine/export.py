"""``export_model``: a standalone Hugging Face model directory, written without ever deleting what it did not write.

The export is written into a temporary sibling directory ``.signal-export-<12 hex>`` and renamed into place.
It carries a marker file, ``signal_export.json``, listing every file the export wrote. The target must be
missing or an empty directory; a non-empty one is refused with a ``ValueError`` unless ``overwrite=True``
*and* it is a previous Signal export holding only the files its marker lists — then it is moved aside,
the new export renamed in, and the old one removed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

MARKER = "signal_export.json"
_TMP = ".signal-export-"


def _files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
        for d in dirnames:  # directories too (a symlink to one is not followed), so an empty one counts
            out.append(os.path.relpath(os.path.join(dirpath, d), root) + "/")
    return sorted(out)


def _check_target(path: str, overwrite: bool) -> bool:
    """Whether ``path`` holds a previous export to replace; raise if it must not be touched."""
    if not os.path.lexists(path):
        return False
    if os.path.islink(path) or not os.path.isdir(path):
        raise ValueError(f"path: {path!r} exists and is not a directory; export_model leaves it as it is")
    present = _files(path)
    if not present:
        return False
    marker = None
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        pass
    listed = marker.get("files") if isinstance(marker, dict) and marker.get("format") == "signal-export" else None
    if not overwrite:
        hint = (" (it is a previous Signal export: pass overwrite=True to replace it)" if listed is not None
                else "")
        raise ValueError(f"path: {path!r} is not empty; export_model writes only into a new or empty "
                         f"directory{hint}")
    if listed is None:
        raise ValueError(f"path: {path!r} is not empty and is not a Signal export (no {MARKER}); overwrite=True "
                         "replaces only a previous export — nothing was deleted")
    foreign = sorted(set(present) - set(listed) - {MARKER})
    if foreign:
        raise ValueError(f"path: {path!r} is a Signal export but also holds files it did not write "
                         f"({foreign[:5]}{' and more' if len(foreign) > 5 else ''}); nothing was deleted")
    return True


def export_dir(path: str, write: Callable[[str], Any], *, overwrite: bool = False) -> str:
    """Call ``write(tmp_dir)`` to fill a temporary directory, then put it at ``path`` (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path (str), got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"path: expected a non-empty directory path without NUL bytes, got {path!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
    path = os.path.abspath(path)
    replace = _check_target(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _TMP + uuid.uuid4().hex[:12])
    os.mkdir(tmp)
    try:
        write(tmp)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump({"format": "signal-export", "files": _files(tmp)}, f, indent=1)
        if replace and _check_target(path, overwrite):  # checked again just before: move it aside, then swap
            old = os.path.join(parent, _TMP + "old-" + uuid.uuid4().hex[:12])
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return path
        os.rename(tmp, path)  # a missing or empty target (rename(2) replaces an empty directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

"""Which server paths an API key may name: its workspace, and its own runs' directories. Nothing else.

Paths in requests (``export_model(path)``, ``load_state(path)``, a ``base_model`` or ``reference_model`` that is a
directory) are paths *on the server*. A relative path is relative to the key's workspace, ``<root>/files/<key id>/``;
an absolute path must lie (symlinks resolved) inside that workspace or inside a run directory this key owns. A
built-in model name, or a hub name already in the server's cache, is passed on as is. A refused path is a
``ValueError`` that says the same whether or not the path exists, so nothing is learned about other keys' files.
"""
from __future__ import annotations

import inspect
import os
import re
from typing import Any, Callable

from signalrl.engine import BUILTIN_MODELS, Run

AUTO_CHECKPOINT = re.compile(r"^auto-\d{12}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


_SIGNATURES: dict[str, inspect.Signature] = {}  # Run.<op>'s, made once (inspect.signature is slow)


def _signature(op: str) -> inspect.Signature:
    sig = _SIGNATURES.get(op)
    if sig is None:
        sig = _SIGNATURES[op] = inspect.signature(getattr(Run, op))
    return sig


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class PathPolicy:
    def __init__(self, files_dir: str, runs_dir: str, owns: Callable[[str, str], bool]):
        self.files_dir = os.path.abspath(files_dir)
        self.runs_dir = os.path.realpath(runs_dir)
        self.owns = owns  # owns(key_id, run_id)

    def workspace(self, key_id: str) -> str:
        ws = os.path.join(self.files_dir, key_id)
        os.makedirs(ws, exist_ok=True)
        return ws

    def _allowed(self, key_id: str, path: str) -> bool:
        real = os.path.realpath(path)
        if _within(real, os.path.realpath(self.workspace(key_id))):
            return True
        if _within(real, self.runs_dir) and real != self.runs_dir:
            run_id = os.path.relpath(real, self.runs_dir).split(os.sep)[0]
            return self.owns(key_id, run_id)
        return False

    def _refuse(self, key_id: str, arg: str, value: str, what: str = "use") -> ValueError:
        return ValueError(f"{arg}: {value!r} is not a path this API key may {what} on the server: give a path relative "
                          f"to (or inside) its workspace {self.workspace(key_id)!r}, or inside one of its runs' "
                          "directories")

    def path(self, key_id: str, value: Any, arg: str) -> Any:
        """A path argument, resolved and checked (anything but a string is left for the engine to refuse)."""
        if not isinstance(value, str) or "\0" in value:
            return value
        full = os.path.normpath(value if os.path.isabs(value) else os.path.join(self.workspace(key_id), value))
        if not self._allowed(key_id, full):
            raise self._refuse(key_id, arg, value)
        return full

    def model(self, key_id: str, value: Any, arg: str) -> Any:
        """A model name: a built-in, a directory this key may read, or a hub name in the server's cache."""
        if not isinstance(value, str) or value in BUILTIN_MODELS or "\0" in value:
            return value
        full = os.path.normpath(value if os.path.isabs(value) else os.path.join(self.workspace(key_id), value))
        if os.path.isdir(full) and self._allowed(key_id, full):
            return full
        if os.path.isabs(value) or not _HUB_ID.match(value) or os.path.exists(value):
            raise ValueError(f"{arg}: could not load {value!r}: on this server a model is a built-in "
                             f"({', '.join(BUILTIN_MODELS)}), a hub model already in the server's cache, or a model "
                             f"directory relative to (or inside) this API key's workspace {self.workspace(key_id)!r} "
                             "or its runs' directories")
        return value

    def request(self, key_id: str, op: str, args: list, kwargs: dict) -> tuple[list, dict]:
        """``(args, kwargs)`` of ``Run.<op>`` with every path checked and made absolute."""
        try:
            bound = _signature(op).bind(None, *args, **kwargs)
        except TypeError:
            return args, kwargs  # the call itself raises the engine's TypeError
        a = bound.arguments
        if op == "export_model":
            a["path"] = self.path(key_id, a.get("path"), "path")
        elif op == "load_state":
            v = a.get("name_or_path")
            if isinstance(v, str) and ("/" in v or os.sep in v):
                a["name_or_path"] = self.path(key_id, v, "name_or_path")
        elif op == "save_state":
            if isinstance(a.get("name"), str) and AUTO_CHECKPOINT.match(a["name"]):
                raise ValueError(f"name: {a['name']!r} is reserved for the server's automatic checkpoints "
                                 "(auto-<12 digits>); choose another name")
        elif op in ("forward", "forward_backward"):
            lk = a.get("loss_kwargs")
            if isinstance(lk, dict) and isinstance(lk.get("reference_model"), str):
                a["loss_kwargs"] = {**lk, "reference_model": self.model(key_id, lk["reference_model"],
                                                                        "reference_model")}
        return list(bound.args[1:]), dict(bound.kwargs)

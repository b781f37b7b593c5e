"""The wire format of the remote training API, shared by the HTTP client and the server.

Nothing read from the network is ever unpickled or ``torch.load``-ed: values travel as JSON, tensors as
safetensors (raw little-endian buffers with a dtype and shape each).

**Values** (:func:`to_wire` / :func:`from_wire`): JSON as written by Python's ``json`` (``NaN`` and ``Infinity``
allowed, floats exact), plus three tagged objects:

- ``{"$tensor": "t0"}``: a tensor of the body's safetensors part (``numpy`` arrays travel as tensors too);
- ``{"$result": "ForwardBackwardResult", "fields": {...}}``: a result dataclass of :mod:`signalrl.engine.types`;
- ``{"$dict": [[key, value], ...]}``: a dict with a key that starts with ``$`` (so user data never looks like a tag).

Tuples become lists; dict keys must be strings.

**Bodies** (:func:`encode_body` / :func:`decode_body`): without tensors, ``application/json``; with tensors,
``application/vnd.signal+safetensors``: a safetensors file whose ``__metadata__["signal"]`` holds the JSON
document. A request body's document is ``{"args": [...], "kwargs": {...}}``.

**Errors** (:func:`encode_error`): ``{"type", "mro", "message", "args"}``; the client turns them back into the
same exception class when it is on its allowlist (:mod:`signalrl.client.errors`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from signalrl.engine import types as _types

JSON = "application/json"
SAFETENSORS = "application/vnd.signal+safetensors"
CONTENT_TYPES = (JSON, SAFETENSORS)
RESULT_TYPES = {cls.__name__: cls for cls in (
    _types.ForwardBackwardResult, _types.ForwardResult, _types.OptimStepResult, _types.SampledSequence,
    _types.SampleResult, _types.CheckpointResult, _types.ScoreResult, _types.LogprobsResult)}
_META_KEY = "signal"
_MAX_DEPTH = 64


class WireError(ValueError):
    """A body that is not a well-formed Signal payload (the server answers 400)."""


# ------------------------------------------------------------------------------------------------ values
# Both directions walk every value of a request or result (a batch of 32 texts is a few hundred), so the common
# case — exact JSON types — is decided by one type lookup, and the location of an error ("value[3]['prompt']") is
# only spelled out when there is one.
_PLAIN = frozenset((str, int, float, bool, type(None)))
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in RESULT_TYPES.values()}


class _Unsendable(TypeError):
    """A part of a value that cannot travel; ``path`` collects its location on the way out of the recursion."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message, self.path = message, []


def to_wire(value: Any, tensors: dict[str, torch.Tensor] | None = None, _depth: int = 0, _where: str = "value") -> Any:
    """``value`` as a JSON-able document; tensors are moved to ``tensors`` (CPU, contiguous) and referenced."""
    try:
        return _encode(value, tensors, _depth)
    except _Unsendable as exc:
        raise TypeError(f"{_where}{''.join(reversed(exc.path))}: {exc.message}") from None


def _child(v: Any, tensors, depth: int, where: str) -> Any:
    try:
        return _encode(v, tensors, depth)
    except _Unsendable as exc:
        exc.path.append(where)
        raise


def _encode(value: Any, tensors: dict[str, torch.Tensor] | None, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _Unsendable(f"nested deeper than {_MAX_DEPTH} levels")
    t = type(value)
    if t in _PLAIN:
        return value
    plain = depth < _MAX_DEPTH  # children of this value may skip the call (their depth check cannot fail)
    if t is dict or (t not in _FIELDS and isinstance(value, dict)):
        for k in value:
            if type(k) is not str and not isinstance(k, str):
                raise _Unsendable(f"dict keys must be strings to travel over HTTP, got {type(k).__name__} {k!r}")
        items = {k: v if plain and type(v) in _PLAIN else _child(v, tensors, depth + 1, f"[{k!r}]")
                 for k, v in value.items()}
        if any(k[:1] == "$" for k in items):
            return {"$dict": [[k, v] for k, v in items.items()]}
        return items
    if t is list or t is tuple:
        return [v if plain and type(v) in _PLAIN else _child(v, tensors, depth + 1, f"[{i}]")
                for i, v in enumerate(value)]
    if isinstance(value, (bool, int, float, str)):
        return value
    if t.__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise _Unsendable("tensors cannot travel in this message")
        name = f"t{len(tensors)}"
        tensors[name] = value
        return {"$tensor": name}
    names = _FIELDS.get(t)
    if names is None and dataclasses.is_dataclass(value) and t.__name__ in RESULT_TYPES:
        names = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        return {"$result": t.__name__, "fields": {n: _child(getattr(value, n), tensors, depth + 1, f".{n}")
                                                  for n in names}}
    if isinstance(value, (list, tuple)):
        return [_child(v, tensors, depth + 1, f"[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise _Unsendable(f"cannot send a {t.__name__} over HTTP (JSON values, tensors and numpy arrays can travel)")


def from_wire(doc: Any, tensors: dict[str, torch.Tensor] | None = None, _depth: int = 0) -> Any:
    """The inverse of :func:`to_wire`; raises :class:`WireError` on a malformed document."""
    if _depth > _MAX_DEPTH:
        raise WireError(f"body: nested deeper than {_MAX_DEPTH} levels")
    plain = _depth < _MAX_DEPTH
    if isinstance(doc, list):
        return [v if plain and type(v) in _PLAIN else from_wire(v, tensors, _depth + 1) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if "$tensor" in doc:
        name = doc["$tensor"]
        if len(doc) != 1 or not isinstance(name, str) or tensors is None or name not in tensors:
            raise WireError(f"body: a tensor reference {doc!r} names no tensor of the body")
        return tensors[name]
    if "$result" in doc:
        cls = RESULT_TYPES.get(doc["$result"])
        fields = doc.get("fields")
        if cls is None or not isinstance(fields, dict):
            raise WireError(f"body: unknown result type {doc.get('$result')!r}")
        known = _FIELDS[cls]
        return cls(**{k: from_wire(v, tensors, _depth + 1) for k, v in fields.items() if k in known})
    if "$dict" in doc:
        pairs = doc["$dict"]
        if len(doc) != 1 or not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
            raise WireError("body: a '$dict' must be a list of [key, value] pairs")
        return {k: from_wire(v, tensors, _depth + 1) for k, v in pairs}
    return {k: v if plain and type(v) in _PLAIN else from_wire(v, tensors, _depth + 1) for k, v in doc.items()}


# ------------------------------------------------------------------------------------------------ bodies
def _sendable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that own their memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        if t.is_complex() or t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"tensor {name}: {t.dtype}/{t.layout} tensors cannot travel (dense real tensors can)")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def encode_body(value: Any) -> tuple[bytes, str]:
    """``(body, content_type)`` for ``value`` (``TypeError`` naming the part that cannot travel)."""
    tensors: dict[str, torch.Tensor] = {}
    doc = to_wire(value, tensors)
    text = json.dumps(doc, separators=(",", ":"))
    if not tensors:
        return text.encode(), JSON
    from safetensors.torch import save

    return save(_sendable(tensors), metadata={_META_KEY: text}), SAFETENSORS


def decode_body(body: bytes, content_type: str) -> Any:
    """The value of a body; :class:`WireError` (a ``ValueError``) with a clear message if it is malformed."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == JSON:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireError(f"body: malformed JSON ({exc})") from None
        except RecursionError:
            raise WireError(f"body: JSON nested deeper than {_MAX_DEPTH} levels") from None
        return from_wire(doc)
    if ctype != SAFETENSORS:
        raise WireError(f"content-type: expected one of {CONTENT_TYPES}, got {content_type!r}")
    if len(body) < 8:
        raise WireError("body: a safetensors body needs an 8-byte header length")
    n = int.from_bytes(body[:8], "little")
    if n > len(body) - 8:
        raise WireError(f"body: the safetensors header claims {n} bytes, the body has {len(body) - 8} after the length")
    try:
        header = json.loads(body[8:8 + n])
        text = header["__metadata__"][_META_KEY]
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
        raise WireError(f"body: the safetensors header has no valid Signal document ({type(exc).__name__}: {exc})") \
            from None
    from safetensors.torch import load

    try:
        tensors = load(bytes(body))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every inconsistency
        raise WireError(f"body: invalid tensor data (a dtype, shape or offset in the safetensors header does not "
                        f"match the bytes): {exc}") from None
    return from_wire(doc, tensors)


def decode_request(body: bytes, content_type: str) -> tuple[list, dict]:
    """``(args, kwargs)`` of a request body ``{"args": [...], "kwargs": {...}}``."""
    doc = decode_body(body, content_type)
    if not isinstance(doc, dict) or set(doc) - {"args", "kwargs"}:
        raise WireError("body: expected a JSON object {\"args\": [...], \"kwargs\": {...}}")
    args, kwargs = doc.get("args", []), doc.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise WireError("body: 'args' must be a list and 'kwargs' an object")
    return args, kwargs


def dumps(value: Any) -> bytes:
    """A JSON-only document (results, run descriptions); ``TypeError`` if a tensor is in it."""
    return json.dumps(to_wire(value), separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------------ errors
def encode_error(exc: BaseException) -> dict[str, Any]:
    """An exception as ``{"type", "mro", "message", "args"}`` (no traceback leaves the server)."""
    mro = [c.__name__ for c in type(exc).__mro__ if c not in (object, BaseException)]
    args = list(exc.args)
    if not all(a is None or isinstance(a, (str, int, float, bool)) for a in args):
        args = [str(exc)]
    return {"type": type(exc).__name__, "mro": mro, "message": str(exc), "args": args}


def error_doc(type_name: str, message: str) -> dict[str, Any]:
    """An error of a server-side kind that has no Python class on the client (it becomes a SignalServerError)."""
    return {"type": type_name, "mro": [type_name], "message": message, "args": [message]}

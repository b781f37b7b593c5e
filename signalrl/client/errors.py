"""Errors of the remote training API, and how a server's error document becomes a Python exception.

A user error on the server (unknown loss, bad kwarg, bad batch, NaN loss, unknown run, ...) is raised by the
remote client as **the same exception class with the same message** as the local engine raises, when that class
is on :data:`ALLOWED` (else as its nearest allowed base class). Everything else is one of these:

- :class:`SignalAuthError` — 401: no key, or an unknown or revoked one;
- :class:`SignalConflictError` — 409: a request number reused with another payload;
- :class:`SignalServerError` — a server fault (5xx, an exception of a kind that is not a user error, a result
  that expired), or, as :class:`SignalConnectionError`, a server that stayed unreachable for the retry deadline.
"""
from __future__ import annotations

from typing import Any

from signalrl.engine import RunNotFoundError
from signalrl.engine.limits import RequestTooLargeError
from signalrl.losses.base import NonFiniteLossError
from signalrl.ops import SignalCheckError


class SignalAPIError(Exception):
    """An error of the remote API itself (not of the request's computation). ``status``: the HTTP status, if any;
    ``remote_type``: the server's name for the error."""

    def __init__(self, message: str, status: int | None = None, remote_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.remote_type = remote_type


class SignalAuthError(SignalAPIError, PermissionError):
    """401: the request carried no API key, or one the server does not know or has revoked."""


class SignalConflictError(SignalAPIError):
    """409: this training client's request number was already used with another payload."""


class SignalServerError(SignalAPIError):
    """A fault on the server's side, distinguishable from a user error of the request."""


class SignalConnectionError(SignalServerError, ConnectionError):
    """The server could not be reached (or kept failing) for the whole retry deadline."""


# Exceptions a request may raise on the server that the client re-raises as the same class.
ALLOWED: dict[str, type[BaseException]] = {cls.__name__: cls for cls in (
    RunNotFoundError, RequestTooLargeError, NonFiniteLossError, SignalCheckError,
    ValueError, TypeError, KeyError, IndexError, LookupError, FloatingPointError, OverflowError, ZeroDivisionError,
    ArithmeticError, NotImplementedError, RuntimeError, AssertionError, TimeoutError, UnicodeError,
)}


def decode_error(doc: Any, status: int | None = None) -> BaseException:
    """The exception for a server error document ``{"type", "mro", "message", "args"}``."""
    if not isinstance(doc, dict):
        return SignalServerError(f"the server answered {status} without an error document: {str(doc)[:500]}", status)
    name = str(doc.get("type", "Error"))
    message = str(doc.get("message", ""))
    args = doc.get("args") if isinstance(doc.get("args"), list) else [message]
    if status == 401 or name == "SignalAuthError":
        return SignalAuthError(message, status, name)
    if status == 409 or name == "SignalConflictError":
        return SignalConflictError(message, status, name)
    for candidate in doc.get("mro") or [name]:
        cls = ALLOWED.get(candidate)
        if cls is None:
            continue
        try:
            exc = cls(*args)
        except Exception:  # noqa: BLE001 - a constructor with other arguments: the message alone
            exc = cls(message)
        exc.remote_type = name  # type: ignore[attr-defined]
        return exc
    return SignalServerError(f"{name}: {message}", status, name)

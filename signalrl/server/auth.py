"""API keys: ``sk-signal-<key id>.<secret>``, shown once; the store keeps the id and a salted hash of the secret.

The secret is 32 random bytes (``secrets.token_urlsafe``), so a salted SHA-256 is enough (nothing to brute-force);
verification compares digests in constant time. A revoked key stops working at its next request.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

from .store import Store

PREFIX = "sk-signal-"
_KEY = re.compile(r"^sk-signal-([0-9a-f]{12})\.([A-Za-z0-9_-]{20,100})$")


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def create_key(store: Store, name: str | None = None) -> tuple[str, str]:
    """A new key: ``(key_id, key)``. The key itself is never stored; print it once."""
    key_id = secrets.token_hex(6)
    while store.get_key(key_id) is not None:
        key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = os.urandom(16)
    store.add_key(key_id, name, salt, _digest(salt, secret))
    return key_id, f"{PREFIX}{key_id}.{secret}"


def verify(store: Store, key: str | None) -> str | None:
    """The key id of a valid, unrevoked ``key``, else None."""
    m = _KEY.match(key or "")
    if m is None:
        return None
    row = store.get_key(m.group(1))
    if row is None or row["revoked_at"] is not None:
        return None
    return m.group(1) if hmac.compare_digest(bytes(row["hash"]), _digest(bytes(row["salt"]), m.group(2))) else None


def key_id_of(key_or_id: str) -> str:
    """``revoke`` takes a key id or a whole key."""
    m = _KEY.match(key_or_id)
    return m.group(1) if m else key_or_id

"""Enrollment keys and device tokens (pure: no I/O, the clock is passed in).

An enrollment key is a bearer secret ``wgk_<43 chars>`` (32 random bytes,
urlsafe base64) that lets a VM enroll a device with the key's tags. A device
token ``wgd_<43 chars>`` is the credential an enrolled agent presents on its
stream. Both are high-entropy, so the store keeps only their SHA-256 (no salt or
slow hash needed) and compares hashes in constant time.

A key is usable while ``now < expires_at``, it is not revoked, and it is
reusable or has not been used yet. Every refusal is the same
:class:`~wiregate.errors.Unauthorized` so a caller cannot probe which it was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from wiregate.errors import Unauthorized

__all__ = [
    "DEVICE_TOKEN_PREFIX",
    "KEY_PREFIX",
    "KeyState",
    "check_usable",
    "generate_device_token",
    "generate_secret",
    "hash_secret",
    "secret_matches",
]

KEY_PREFIX = "wgk_"
DEVICE_TOKEN_PREFIX = "wgd_"  # noqa: S105 (a prefix, not a secret)
_RANDOM_BYTES = 32
_REFUSED = "enrollment key is not valid"
_HINT = "ask an administrator for a fresh enrollment key"


@dataclass(frozen=True, slots=True)
class KeyState:
    """What decides whether an enrollment key may be used now."""

    expires_at: float
    reusable: bool
    used_count: int
    revoked: bool


def generate_secret() -> str:
    """A fresh enrollment key secret, ``wgk_`` + 32 random bytes (urlsafe base64)."""
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def generate_device_token() -> str:
    """A fresh device credential, ``wgd_`` + 32 random bytes (urlsafe base64)."""
    return DEVICE_TOKEN_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def hash_secret(secret: str) -> str:
    """The hex SHA-256 under which a secret is stored (never the secret itself)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret).encode(), stored_hash.encode())


def check_usable(state: KeyState | None, now: float) -> None:
    """Raise :class:`Unauthorized` unless a key in ``state`` may enroll at ``now``.

    ``None`` stands for an unknown key. The message never says which check failed.
    """
    if state is None or _refused(state, now):
        raise Unauthorized(_REFUSED, code="invalid_auth_key", hint=_HINT)


def _refused(state: KeyState, now: float) -> bool:
    spent = not state.reusable and state.used_count > 0
    return state.revoked or spent or now >= state.expires_at

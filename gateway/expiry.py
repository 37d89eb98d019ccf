"""Device key lifetimes: how long a WireGuard key is accepted before the device must rotate.

People's devices (enrolled by a device login) get ``key_expiry`` from the
settings; nodes enrolled with an enrollment key get none unless the key says so
(``device_key_expiry``). A policy file can supply its own rule: any function
with the :data:`~gateway.store.KeyLifetime` signature, handed to
:meth:`gateway.store.Store.set_key_lifetime` (:func:`install` does that).

Agents rotate at :data:`ROTATE_AT` of the lifetime (make-before-break, see
:mod:`gateway.agent.rotation`), so a running device never reaches its expiry.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.model import Identity
from gateway.store import KeyLifetime, Store
from gateway.store.records import ENROLLMENT_ISSUER

__all__ = ["DEFAULT_KEY_EXPIRY", "ROTATE_AT", "install", "people_lifetime", "rotate_after"]

DEFAULT_KEY_EXPIRY = 180 * 86400.0
ROTATE_AT = 2 / 3


def people_lifetime(seconds: float | None) -> KeyLifetime:
    """Keys of people's devices live ``seconds`` (None or 0: forever); enrolled nodes' forever."""
    people = seconds if seconds is not None and seconds > 0 else None

    def lifetime(identity: Identity, _tags: Sequence[str]) -> float | None:
        return None if identity.issuer == ENROLLMENT_ISSUER else people

    return lifetime


def install(store: Store, lifetime: KeyLifetime) -> None:
    """Use ``lifetime`` for the devices enrolled from now on."""
    store.set_key_lifetime(lifetime)


def rotate_after(issued: float, expires: float | None) -> float | None:
    """When a key issued at ``issued`` and expiring at ``expires`` should be rotated."""
    if expires is None:
        return None
    return issued + (expires - issued) * ROTATE_AT

"""Device key lifetimes: how long a WireGuard key is accepted before the device must rotate.

People's devices (enrolled by a device login) get ``key_expiry`` from the
settings; nodes enrolled with an enrollment key get none unless the key says so
(``device_key_expiry``). Any function with the :data:`~gateway.store.KeyLifetime`
signature can be handed to :meth:`gateway.store.Store.set_key_lifetime`.

Agents rotate at :data:`wiregate.keylife.ROTATE_AT` of the lifetime
(make-before-break, see :mod:`agent.rotation`), so a running device never
reaches its expiry.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store import KeyLifetime
from gateway.store.records import ENROLLMENT_ISSUER
from wiregate.model import Identity

__all__ = ["people_lifetime"]


def people_lifetime(seconds: float | None) -> KeyLifetime:
    """Keys of people's devices live ``seconds`` (None or 0: forever); enrolled nodes' forever."""
    people = seconds if seconds is not None and seconds > 0 else None

    def lifetime(identity: Identity, _tags: Sequence[str]) -> float | None:
        return None if identity.issuer == ENROLLMENT_ISSUER else people

    return lifetime

"""When an agent rotates its key: at :data:`ROTATE_AT` of the key's lifetime (pure).

The gateway decides each key's lifetime (:mod:`gateway.lifecycle.expiry`); the
agent rotates make-before-break at two thirds of it (:mod:`agent.rotation`), so
a running device never reaches its expiry.
"""

from __future__ import annotations

__all__ = ["ROTATE_AT", "rotate_after"]

ROTATE_AT = 2 / 3


def rotate_after(issued: float, expires: float | None) -> float | None:
    """When a key issued at ``issued`` and expiring at ``expires`` should be rotated."""
    if expires is None:
        return None
    return issued + (expires - issued) * ROTATE_AT

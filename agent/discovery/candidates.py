"""The endpoint candidates an agent advertises, merged from their three sources.

Order matters: peers take the first candidate as the WireGuard endpoint. Endpoints
the operator configured come first, then the STUN-discovered reflexive address
(reachable from anywhere when the NAT is open or endpoint-independent), then the
host's own addresses (reachable on the same LAN only, when behind NAT).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["merge_candidates"]


def merge_candidates(
    configured: Iterable[str], reflexive: str | None, local: Iterable[str]
) -> list[str]:
    """``configured``, then ``reflexive``, then ``local``; each endpoint once, first place wins."""
    ordered = [*configured, *([reflexive] if reflexive else []), *local]
    return list(dict.fromkeys(ordered))

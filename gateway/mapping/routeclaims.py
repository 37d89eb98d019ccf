"""Which device carries which advertised prefix: first come, first served (pure).

Two devices must never carry overlapping routes: every viewer would then hold
two peers with overlapping allowed IPs and refuse one of them (WireGuard routes
a prefix to one peer only). :class:`RouteClaims` records the prefixes each
device carries and finds, for a new prefix, the devices whose prefixes overlap
it, on the agent's incremental :class:`~wiregate.intervals.OverlapIndex`
(a cost in the prefix lengths in use and the overlaps found, not in the number
of routes).

A device's own prefixes may overlap each other (a /16 and a /24 inside it);
they are not a clash.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from wiregate.intervals import OverlapIndex, Span

__all__ = ["RouteClaims"]

_PROBE = "\x00probe"  # a transient owner: never a device id


def _span(route: str) -> Span | None:
    try:
        net = ipaddress.ip_network(route, strict=False)
    except ValueError:
        return None
    return net.version, int(net.network_address), net.prefixlen


class RouteClaims:
    """Owners (device ids) of advertised prefixes."""

    def __init__(self) -> None:
        self._index = OverlapIndex()

    def overlapping(self, route: str) -> set[str]:
        """The owners of prefixes overlapping ``route`` (empty for a malformed one)."""
        span = _span(route)
        if span is None:
            return set()
        self._index.assign(_PROBE, [span])
        found = set(self._index.clashes.get(_PROBE, ()))
        self._index.remove(_PROBE)
        return found

    def claim(self, owner: str, routes: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Give ``owner`` the ``routes`` no other owner overlaps: ``(kept, refused)``.

        Replaces whatever ``owner`` held before.
        """
        self.release(owner)
        kept: list[str] = []
        refused: list[str] = []
        spans: list[Span] = []
        for route in routes:
            span = _span(route)
            if self.overlapping(route) - {owner}:
                refused.append(route)
                continue
            kept.append(route)
            if span is not None:
                spans.append(span)
        if spans:
            self._index.assign(owner, spans)
        return tuple(kept), tuple(refused)

    def release(self, owner: str) -> None:
        """Forget what ``owner`` holds."""
        self._index.remove(owner)

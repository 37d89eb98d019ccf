"""Port specifications of the policy and of a peer's ``filter`` (pure codec).

A spec names what a peer may open on a device::

    "tcp:5432"      one TCP port          "udp:53"     one UDP port
    "tcp:8000-8099" a TCP port range      "udp"        every UDP port
    "tcp"           every TCP port        "icmp"       ICMP and ICMPv6

:func:`parse_port` returns the canonical :class:`PortSpec` or raises
:class:`ValueError` with a message fit for a path-prefixed error; ``str(spec)``
is the canonical text (``"tcp:80-80"`` becomes ``"tcp:80"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PortSpec", "canonical_ports", "parse_port"]

_SPEC = re.compile(r"^(tcp|udp|icmp)(?::([0-9]{1,5})(?:-([0-9]{1,5}))?)?$")


@dataclass(frozen=True, slots=True, order=True)
class PortSpec:
    """A protocol and, for TCP and UDP, an inclusive port range (None: every port)."""

    proto: str
    low: int | None = None
    high: int | None = None

    def __str__(self) -> str:
        if self.low is None:
            return self.proto
        if self.low == self.high:
            return f"{self.proto}:{self.low}"
        return f"{self.proto}:{self.low}-{self.high}"


def parse_port(text: object) -> PortSpec:
    """The :class:`PortSpec` of ``text``, or :class:`ValueError` saying what is wrong."""
    match = _SPEC.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a port spec (tcp:PORT, tcp:LOW-HIGH, tcp, udp:PORT, udp, icmp)"
        )
    proto, low_text, high_text = match.groups()
    if low_text is None:
        return PortSpec(proto)
    if proto == "icmp":
        raise ValueError(f"{text!r}: icmp takes no port")
    low = int(low_text)
    high = int(high_text) if high_text is not None else low
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: ports are 1-65535, low <= high")
    return PortSpec(proto, low, high)


def canonical_ports(specs: Iterable[PortSpec]) -> tuple[str, ...]:
    """Distinct specs as canonical text, sorted by protocol then port."""
    return tuple(str(s) for s in sorted(set(specs), key=lambda s: (s.proto, s.low or 0, s.high)))

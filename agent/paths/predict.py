"""Hard-NAT traversal by bounded port prediction: which probes, where, when (pure).

A peer behind symmetric NAT ("hard") gets a new mapping for every destination, so
nothing it advertises is an address we can send to. Its handshake towards our
reflexive endpoint still reaches us if our NAT lets it in: an address-dependent
filter ("easy" side) does, once we have sent anything to the peer's public
address; a port-dependent filter does only if we sent to the very port the
peer's NAT picked. So when this side is behind an endpoint-independent mapping
and the peer behind symmetric NAT, this side sends a bounded burst of small
probes from the WireGuard port (a raw socket, as for STUN) towards the peer's
published address: its advertised port first, then the ports around it, nearest
first (NATs that allocate sequentially or preserve the port land there). The
peer, on the same wall-clock moment, restarts its handshake towards us every
second for the length of a probe; the first one that gets through makes
WireGuard roam to the peer's real mapping, and the path machine adopts it.

Limits, by construction: at most :data:`MAX_PROBES` probes per attempt, at most
:data:`MAX_RATE` per second, only towards the one address the peer published (a
public IPv4 address; never a private, loopback or link-local one), and only at
the moments both sides already meet for direct attempts (the first probe and
the retry grid). Against a NAT that picks random ports and filters by port, a
few hundred probes rarely hit (about budget / 64512): such pairs stay relayed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.dataplane.backend import parse_endpoint
from agent.discovery.netcheck import NatType
from wiregate.net import destination_refusal

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_RATE",
    "MAX_PROBES",
    "MAX_RATE",
    "PredictionPlan",
    "plan_prediction",
    "prediction_applies",
]

MAX_PROBES = 512
MAX_RATE = 1000.0  # probes per second
DEFAULT_PROBES = 128
DEFAULT_RATE = 250.0


@dataclass(frozen=True, slots=True)
class PredictionPlan:
    """Send one probe to ``address`` at each of ``ports``, ``interval`` s apart, from ``at``."""

    address: str
    ports: tuple[int, ...]
    interval: float
    at: float

    @property
    def duration(self) -> float:
        """Seconds from the first probe to the last."""
        return max(len(self.ports) - 1, 0) * self.interval


def prediction_applies(ours: NatType, theirs: NatType | None) -> bool:
    """Whether this side should predict: an endpoint-independent mapping here (the peer
    knows where to send), a symmetric NAT there (we cannot know where it sends from)."""
    return ours is NatType.EIM and theirs is NatType.SYMMETRIC


def plan_prediction(
    endpoint: str, now: float, *, probes: int = DEFAULT_PROBES, rate: float = DEFAULT_RATE
) -> PredictionPlan | None:
    """The probes towards the peer's published ``endpoint`` (``IPv4:port``), starting
    ``now``; None when the endpoint is no public IPv4 address. ``probes`` and ``rate``
    are clamped to :data:`MAX_PROBES` and :data:`MAX_RATE`."""
    try:
        address, port = parse_endpoint(endpoint)
    except ValueError:
        return None
    if not isinstance(address, ipaddress.IPv4Address) or not _public(address):
        return None
    count = max(1, min(probes, MAX_PROBES))
    interval = 1.0 / max(1.0, min(rate, MAX_RATE))
    return PredictionPlan(str(address), _ports_around(port, count), interval, now)


def _ports_around(port: int, count: int) -> tuple[int, ...]:
    """``port``, then port+1, port-1, port+2, ... within 1024..65535, ``count`` in all."""
    out = [port] if 1024 <= port <= 65535 else []
    step = 1
    while len(out) < count and step < 65536:
        for candidate in (port + step, port - step):
            if 1024 <= candidate <= 65535 and len(out) < count:
                out.append(candidate)
        step += 1
    return tuple(out)


def _public(address: ipaddress.IPv4Address) -> bool:
    """Worth probing: nothing :func:`~wiregate.net.destination_refusal` refuses, and no
    private (RFC 1918) or shared (RFC 6598) address, which no NAT publishes."""
    if destination_refusal(address) is not None:
        return False
    return not any(address in n for n in _NOT_PUBLISHED)


_NOT_PUBLISHED = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)

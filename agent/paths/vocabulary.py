"""The path machine's vocabulary, which candidate to try first, and how a path is explained.

The events and actions of :class:`~agent.paths.machine.PathMachine` (frozen,
slotted values, re-exported by :mod:`agent.paths.machine`) live here with the
pure pieces the machine consults.

:func:`rank_candidates` orders a peer's advertised endpoints for
:class:`~agent.paths.machine.PathMachine`:

0. when both sides share a public (reflexive) address - the same NAT - the
   peer's private endpoints on one of this host's local networks, then its other
   private endpoints (hairpinning through the shared NAT often fails);
1. otherwise the peer's reflexive endpoint (given, or its first public one),
   then its other public endpoints;
2. then private endpoints on one of this host's networks, then everything else.

Ties keep the order the peer advertised; malformed endpoints are dropped. The
order is deterministic: the same inputs always give the same list.

:func:`blocker` decides up front when trying direct is pointless, and
:class:`PathReport` is what ``wiregate status`` shows for one peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from agent.dataplane.backend import IPAddress, parse_endpoint
from agent.discovery.netcheck import NatType, NetReport

__all__ = [
    "OTHER",
    "Action",
    "Event",
    "Handshake",
    "LocalNat",
    "PathKind",
    "PathReport",
    "PathTimers",
    "PeerUpdate",
    "Ranked",
    "RelayFailed",
    "RelayReady",
    "ReleaseRelay",
    "RequestRelay",
    "SetEndpoint",
    "Tick",
    "blocker",
    "direct_reason",
    "rank_candidates",
]

PathKind = Literal["direct", "relayed", "probing", "failed"]
_PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
SAME_NAT, SAME_NAT_OTHER, REFLEXIVE, PUBLIC, LOCAL_NET, OTHER = range(6)


@dataclass(frozen=True, slots=True)
class PathTimers:
    """Seconds: probe per candidate, handshake silence, relay answer, retry backoff."""

    probe_timeout: float = 5.0
    silence: float = 180.0
    relay_timeout: float = 15.0
    retry_first: float = 30.0
    retry_max: float = 240.0  # retry_first * 2**k, so that the retry grids nest


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalNat:
    """Our netcheck summary: NAT type, reflexive endpoint, this host's networks (CIDRs)."""

    now: float
    nat: NatType
    reflexive: str | None = None
    networks: tuple[str, ...] = ()
    kind: ClassVar[str] = "local_nat"

    @classmethod
    def from_report(cls, report: NetReport, networks: tuple[str, ...] = ()) -> LocalNat:
        """The summary of ``report`` (its reflexive address only when usable)."""
        return cls(report.checked_at, report.nat_type, report.usable_reflexive, networks)


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """The peer's advertised endpoints (and NAT type / reflexive endpoint when known)."""

    now: float
    endpoints: tuple[str, ...]
    nat: NatType | None = None
    reflexive: str | None = None
    kind: ClassVar[str] = "peer"


@dataclass(frozen=True, slots=True)
class Handshake:
    """The device's latest handshake with the peer (None: never) and its live endpoint."""

    now: float
    latest: float | None
    endpoint: str | None = None
    kind: ClassVar[str] = "handshake"


@dataclass(frozen=True, slots=True)
class RelayReady:
    """The relay allocation for this peer is bound: send to ``endpoint``."""

    now: float
    endpoint: str
    kind: ClassVar[str] = "relay_ready"


@dataclass(frozen=True, slots=True)
class RelayFailed:
    """No ticket, or the relay refused or dropped the allocation."""

    now: float
    reason: str
    kind: ClassVar[str] = "relay_failed"


@dataclass(frozen=True, slots=True)
class Tick:
    """The timer fired (or the caller just wants the machine to look at the time)."""

    now: float
    kind: ClassVar[str] = "tick"


Event = LocalNat | PeerUpdate | Handshake | RelayReady | RelayFailed | Tick


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetEndpoint:
    """Program ``endpoint`` as the peer's WireGuard endpoint."""

    peer_id: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class RequestRelay:
    """Get a ticket for this peer and bind at the relay; answer RelayReady or RelayFailed."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class ReleaseRelay:
    """Cancel the relay request or drop the allocation for this peer."""

    peer_id: str


Action = SetEndpoint | RequestRelay | ReleaseRelay


@dataclass(frozen=True, slots=True)
class PathReport:
    """The path to one peer, for people: which, where to, since when, and why."""

    path: PathKind
    endpoint: str | None
    since: float
    reason: str
    state: str


@dataclass(frozen=True, slots=True)
class Ranked:
    """The peer's valid endpoints, best first, with the rank each one got."""

    order: tuple[str, ...]
    ranks: tuple[int, ...]

    @property
    def on_local_network(self) -> bool:
        """Whether some endpoint lies on one of this host's networks (a LAN path)."""
        return any(r in (SAME_NAT, LOCAL_NET) for r in self.ranks)

    def rank_of(self, endpoint: str | None) -> int | None:
        """The rank of ``endpoint``, None if it is not a candidate."""
        if endpoint not in self.order:
            return None
        return self.ranks[self.order.index(endpoint)]


def _address(endpoint: str | None) -> IPAddress | None:
    if endpoint is None:
        return None
    try:
        return parse_endpoint(endpoint)[0]
    except ValueError:
        return None


def _is_private(address: IPAddress) -> bool:
    return any(address in n for n in _PRIVATE if n.version == address.version)


def _networks(texts: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """This host's networks; a bare address counts as its /24 (IPv4) or /64 (IPv6)."""
    out = []
    for text in texts:
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            continue
        bare = "/" not in text
        out.append(iface.network if not bare else iface.network.supernet(new_prefix=_lan(iface)))
    return out


def _lan(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> int:
    return 24 if iface.version == 4 else 64


def rank_candidates(
    endpoints: Sequence[str],
    *,
    peer_reflexive: str | None,
    our_reflexive: str | None,
    our_networks: Iterable[str] = (),
) -> Ranked:
    """Order ``endpoints`` as the module docstring says."""
    valid = [(e, a) for e in dict.fromkeys(endpoints) if (a := _address(e)) is not None]
    if peer_reflexive is None:
        peer_reflexive = next((e for e, a in valid if not _is_private(a)), None)
    ours, theirs = _address(our_reflexive), _address(peer_reflexive)
    same_nat = ours is not None and ours == theirs
    nets = _networks(our_networks)
    ranked = sorted(
        (
            (_rank(e, a, same_nat, e == peer_reflexive, nets), i, e)
            for i, (e, a) in enumerate(valid)
        ),
    )
    return Ranked(tuple(e for _, _, e in ranked), tuple(r for r, _, _ in ranked))


def _rank(
    endpoint: str,
    address: IPAddress,
    same_nat: bool,
    reflexive: bool,
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> int:
    local = any(address in n for n in nets if n.version == address.version)
    if _is_private(address):
        if same_nat:
            return SAME_NAT if local else SAME_NAT_OTHER
        return LOCAL_NET if local else OTHER
    return REFLEXIVE if reflexive else PUBLIC


def blocker(ours: NatType, theirs: NatType | None, ranked: Ranked) -> str | None:
    """Why direct is pointless for this pair, or None to try it."""
    if ours is NatType.UDP_BLOCKED:
        return "UDP blocked on this network"
    if theirs is NatType.UDP_BLOCKED:
        return "UDP blocked on the peer's network"
    both_symmetric = ours is NatType.SYMMETRIC and theirs is NatType.SYMMETRIC
    if both_symmetric and not ranked.on_local_network:
        return "both sides behind symmetric NAT"
    if not ranked.order:
        return "the peer advertises no direct endpoint"
    return None


def direct_reason(rank: int | None, ours: NatType, theirs: NatType | None) -> str:
    """Why the direct path works, as far as the evidence says."""
    if rank in (SAME_NAT, SAME_NAT_OTHER):
        return "same NAT as the peer: using its private address (no hairpin)"
    if rank == LOCAL_NET:
        return "peer is on this host's local network"
    if theirs is NatType.OPEN:
        return "peer is reachable directly (open host)"
    if ours is NatType.OPEN:
        return "this host is reachable directly (open host)"
    return f"hole punched through NAT ({ours} <-> {theirs or 'unknown'})"

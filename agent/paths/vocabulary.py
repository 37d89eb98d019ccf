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
from agent.paths.predict import PredictionPlan

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
    "Predict",
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
    "relay_reason",
    "sendable",
    "worth_kicking",
]

PathKind = Literal["direct", "relayed", "probing", "failed"]
_PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
SAME_NAT, SAME_NAT_OTHER, REFLEXIVE, PUBLIC, LOCAL_NET, OTHER = range(6)


@dataclass(frozen=True, slots=True)
class PathTimers:
    """Seconds: probe per candidate, handshake silence, relay answer, retry backoff;
    ``kick``: how often a probe restarts WireGuard's handshake (it would retransmit an
    unanswered initiation only after 5 s, longer than a probe lasts)."""

    probe_timeout: float = 5.0
    kick: float = 1.0
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
    """The device's latest handshake with the peer (None: never) and its live endpoint.

    ``before_write``: read just before the runner writes the machine's newest choice
    with a fresh session (see :meth:`~agent.paths.machine.PathMachine.wants_fresh_handshake`).
    Such a read says nothing about that choice, which is not on the device yet; it
    tells only whether the peer set up a session since the previous read, which the
    reset would throw away."""

    now: float
    latest: float | None
    endpoint: str | None = None
    before_write: bool = False
    kind: ClassVar[str] = "handshake"


@dataclass(frozen=True, slots=True)
class RelayReady:
    """The relay allocation for this peer is bound: send to ``endpoint``.

    ``via_tcp``: the binding is carried over TLS/TCP (UDP blocked here), and how to
    say so, e.g. ``"TCP 443 via relay r1"`` (see :mod:`agent.paths.tcplink`)."""

    now: float
    endpoint: str
    via_tcp: str = ""
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


@dataclass(frozen=True, slots=True)
class Predict:
    """Send the probes of ``plan`` from the WireGuard port (see :mod:`agent.paths.predict`)."""

    peer_id: str
    plan: PredictionPlan


Action = SetEndpoint | RequestRelay | ReleaseRelay | Predict


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


def direct_reason(
    rank: int | None,
    ours: NatType,
    theirs: NatType | None,
    roamed: str | None = None,
    predicted: int = 0,
) -> str:
    """Why the direct path works, as far as the evidence says (``roamed``: the peer's
    address the handshake came from, when it is none of the candidates; ``predicted``:
    the probes of the port prediction that let it in, if one did)."""
    if predicted:
        return f"direct through hard NAT by port prediction after {predicted} probes"
    if rank in (SAME_NAT, SAME_NAT_OTHER):
        return "same NAT as the peer: using its private address (no hairpin)"
    if rank == LOCAL_NET:
        return "peer is on this host's local network"
    if theirs is NatType.OPEN:
        return "peer is reachable directly (open host)"
    reached = "" if roamed is None else f"; the peer reached it from {roamed}"
    if ours is NatType.OPEN:
        return f"this host is reachable directly (open host){reached}"
    if roamed is not None:
        return f"the peer reached this host directly from {roamed} ({ours} <-> {_nat(theirs)})"
    return f"hole punched through NAT ({ours} <-> {_nat(theirs)})"


def relay_reason(ours: NatType, theirs: NatType | None, timeout: float) -> str:
    """Why direct failed after every candidate was probed, naming the NATs when known."""
    why = f"no handshake on any direct candidate within {timeout:g} s"
    hard = NatType.SYMMETRIC in (ours, theirs) and NatType.OPEN not in (ours, theirs)
    if hard:
        side = "this host's" if ours is NatType.SYMMETRIC else "the peer's"
        return f"{why} ({ours} <-> {_nat(theirs)}: {side} symmetric NAT maps every peer anew)"
    return why


def worth_kicking(rank: int | None, theirs: NatType | None) -> bool:
    """Whether a candidate of ``rank`` is worth restarting WireGuard's handshake for.

    A private address on a network of neither side is tried gently, if at all; so is
    every non-local address of a peer behind symmetric NAT: its NAT maps each
    destination anew, so nothing it advertises is a mapping we could send to (it
    reaches us, if we are reachable, and WireGuard roams to where it came from)."""
    if rank is None or rank >= OTHER:
        return False
    return theirs is not NatType.SYMMETRIC or rank < REFLEXIVE


def sendable(rank: int | None, theirs: NatType | None) -> bool:
    """Whether sending to a candidate of ``rank`` can reach the peer at all: not so for
    a non-local address of a peer behind symmetric NAT (its NAT maps each destination
    anew, so what it advertises has no mapping towards us behind it). Relay endpoints
    and addresses WireGuard roamed to (no rank) are always sendable."""
    return rank is None or theirs is not NatType.SYMMETRIC or rank < REFLEXIVE


def _nat(nat: NatType | None) -> str:
    return "unknown" if nat is None else str(nat)

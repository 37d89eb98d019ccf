"""The nodes' own traffic through the tunnel: which host addresses go where (pure).

A cluster node's agent advertises its InternalIPs as single-address routes
(``10.0.0.12/32``); the gateway approves them like any route (the policy gives
host ranges to ``tag:node`` only). On the other nodes these addresses are then
allowed IPs of that node's peer. This module decides, for each such *host
destination*, whether its route goes into the tunnel table:

* ``off``: host destinations are left alone (routed like any allowed IP, which
  is how a map without host routes behaves).
* ``nonstrict`` (the default when host traffic is on): the route is present only
  while the peer has a fresh handshake; otherwise it is withheld, the kernel
  falls back to the main table and the traffic goes in clear. Each fallback is
  counted and reported.
* ``strict``: the route is always present, so nothing goes in clear; the packet
  filter (:func:`host_ruleset`) also drops clear traffic to these addresses that
  would bypass the tunnel table, except WireGuard's own packets (by fwmark).

Whatever the mode, an address inside an *exempt* network (the API server's
addresses from the settings, the gateway's resolved address) is never routed
into the tunnel and never dropped: a node cannot lock itself out of the control
plane (docs/host-traffic.md, "Lock-out analysis").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.dataplane.backend import IPNetwork
from wiregate.model import Peer

__all__ = [
    "FRESH_SECONDS",
    "MODES",
    "HostDestination",
    "HostPlan",
    "HostPolicy",
    "HostTracker",
    "host_addresses",
    "host_ruleset",
    "plan_host_traffic",
]

MODES = ("off", "nonstrict", "strict")
FRESH_SECONDS = 30.0  # no sign of life (handshake or any packet) for this long: stale
HOST_TABLE = "wiregate-host"

ENCRYPTED = "encrypted"  # routed into the tunnel, the peer has a fresh handshake
HELD = "held"  # strict: routed into the tunnel, no fresh handshake: waits, never clear
CLEAR = "clear"  # nonstrict fallback: no fresh handshake, route withheld, in clear
EXEMPT = "exempt"  # API server / gateway: never in the tunnel
STATES = (ENCRYPTED, HELD, CLEAR, EXEMPT)


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The host-traffic settings of one agent."""

    mode: str = "off"
    node_tag: str = "tag:node"  # only peers carrying this tag have host destinations
    exempt: frozenset[IPNetwork] = frozenset()
    fresh_seconds: float = FRESH_SECONDS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"host traffic mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.fresh_seconds <= 0:
            raise ValueError("host traffic fresh_seconds must be positive")

    @property
    def enabled(self) -> bool:
        """True unless the mode is ``off``."""
        return self.mode != "off"

    def is_exempt(self, address: IPNetwork) -> bool:
        """True when ``address`` lies in an exempt network."""
        return any(address.version == n.version and address.subnet_of(n) for n in self.exempt)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class HostDestination:
    """One peer node's host address and what happens to traffic sent to it."""

    address: IPNetwork
    peer: str  # the peer's device name
    public_key: str
    state: str  # one of STATES


@dataclass(frozen=True, slots=True)
class HostPlan:
    """Every host destination of the map, sorted by address."""

    mode: str = "off"
    destinations: tuple[HostDestination, ...] = ()

    def _with(self, *states: str) -> frozenset[IPNetwork]:
        return frozenset(d.address for d in self.destinations if d.state in states)

    @property
    def withheld(self) -> frozenset[IPNetwork]:
        """Host routes kept out of the tunnel table (clear fallback and exempt)."""
        return self._with(CLEAR, EXEMPT)

    @property
    def guarded(self) -> frozenset[IPNetwork]:
        """Strict mode: the addresses clear traffic to which the filter drops."""
        return self._with(ENCRYPTED, HELD) if self.mode == "strict" else frozenset()

    @property
    def watched(self) -> frozenset[IPNetwork]:
        """The addresses whose clear packets the filter counts (every non-exempt one)."""
        return self._with(ENCRYPTED, HELD, CLEAR)

    @property
    def stale_keys(self) -> frozenset[str]:
        """Peers without a fresh handshake that have host destinations (to be nudged)."""
        return frozenset(d.public_key for d in self.destinations if d.state in (CLEAR, HELD))

    @property
    def peer_keys(self) -> frozenset[str]:
        """Peers with a non-exempt host destination (nudged, so a live one answers)."""
        return frozenset(d.public_key for d in self.destinations if d.state != EXEMPT)

    def routes(self, routes: frozenset[IPNetwork]) -> frozenset[IPNetwork]:
        """``routes`` (the tunnel table's, from the map) less the withheld host routes."""
        withheld = self.withheld
        return routes - withheld if withheld else routes

    def counts(self) -> dict[str, int]:
        """How many destinations are in each state."""
        result = dict.fromkeys(STATES, 0)
        for d in self.destinations:
            result[d.state] += 1
        return result


def host_addresses(peer: Peer, allowed: Iterable[IPNetwork], node_tag: str) -> list[IPNetwork]:
    """The host destinations of ``peer``: its single-address allowed IPs that are not
    its tunnel addresses, if it carries ``node_tag``; none otherwise."""
    if node_tag not in peer.tags:
        return []
    own = {ipaddress.ip_network(a, strict=False) for a in peer.addresses}
    return [n for n in allowed if n.prefixlen == n.max_prefixlen and n not in own]


def plan_host_traffic(
    peers: Iterable[Peer],
    allowed: Mapping[str, frozenset[IPNetwork]],
    handshakes: Mapping[str, float | None],
    policy: HostPolicy,
    now: float,
) -> HostPlan:
    """Decide every host destination's state.

    ``allowed`` maps the public keys of the validated peers to their allowed IPs
    (a refused peer has none); ``handshakes`` maps public keys to WireGuard's
    latest handshake (POSIX seconds); ``now`` is on the same clock.
    """
    if not policy.enabled:
        return HostPlan()
    found: list[HostDestination] = []
    for peer in peers:
        nets = allowed.get(peer.public_key)
        if not nets:
            continue
        fresh = _fresh(handshakes.get(peer.public_key), now, policy.fresh_seconds)
        for address in host_addresses(peer, nets, policy.node_tag):
            state = _state(policy, address, fresh)
            found.append(HostDestination(address, peer.name, peer.public_key, state))
    found.sort(key=lambda d: (d.address.version, int(d.address.network_address)))
    return HostPlan(policy.mode, tuple(found))


def _fresh(last: float | None, now: float, limit: float) -> bool:
    return last is not None and last > 0 and now - last < limit


def _state(policy: HostPolicy, address: IPNetwork, fresh: bool) -> str:
    if policy.is_exempt(address):
        return EXEMPT
    if fresh:
        return ENCRYPTED
    return HELD if policy.mode == "strict" else CLEAR


@dataclass(slots=True)
class HostTracker:
    """Counts clear fallbacks: each time a destination goes from another state to
    ``clear`` (a new node starts in clear until its first handshake, and counts)."""

    fallbacks: int = 0
    last: dict[str, str] = field(default_factory=dict)  # address -> state

    def observe(self, plan: HostPlan) -> int:
        """Record ``plan``; return how many destinations fell back to clear in it."""
        current = {str(d.address): d.state for d in plan.destinations}
        new = sum(1 for a, s in current.items() if s == CLEAR and self.last.get(a) != CLEAR)
        self.fallbacks += new
        self.last = current
        return new


def host_ruleset(interface: str, fwmark: int, plan: HostPlan) -> str:
    """The nftables script of table ``inet wiregate-host`` for ``plan``.

    Packets the host sends or forwards to a watched address through anything but
    the tunnel interface, and not marked as WireGuard's own, are counted
    (``clear_out``); in strict mode they are dropped as well. Exempt addresses
    are never in the sets. An empty plan deletes the table.
    """
    head = f"table inet {HOST_TABLE}\ndelete table inet {HOST_TABLE}\n"
    if not plan.destinations:
        return head
    verdict = " drop" if plan.mode == "strict" else ""
    lines = [
        f"table inet {HOST_TABLE} {{",
        "  counter clear_out { }",
        *_set("hosts4", "ipv4_addr", plan.watched, 4),
        *_set("hosts6", "ipv6_addr", plan.watched, 6),
        *_chain("out", "output", interface, fwmark, verdict),
        *_chain("routed", "forward", interface, fwmark, verdict),
        "}",
    ]
    return head + "\n".join(lines) + "\n"


def _chain(name: str, hook: str, interface: str, fwmark: int, verdict: str) -> list[str]:
    return [
        f"  chain {name} {{",
        f"    type filter hook {hook} priority 0; policy accept;",
        f'    oifname "{interface}" accept',
        f"    meta mark {fwmark:#x} accept",
        f'    ip daddr @hosts4 counter name "clear_out"{verdict}',
        f'    ip6 daddr @hosts6 counter name "clear_out"{verdict}',
        "  }",
    ]


def _set(name: str, kind: str, nets: frozenset[IPNetwork], version: int) -> list[str]:
    members = sorted(
        (n for n in nets if n.version == version), key=lambda n: int(n.network_address)
    )
    elements = (
        f" elements = {{ {', '.join(str(n.network_address) for n in members)} }};"
        if members
        else ""
    )
    return [f"  set {name} {{ type {kind};{elements} }}"]

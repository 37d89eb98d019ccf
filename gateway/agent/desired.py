"""NetMap + local settings -> the configuration the host should have (pure).

Everything that comes from the control plane is validated here (SECURITY.md,
"Agent and data plane"). An offending peer is dropped and reported in
``DesiredConfig.problems``; the rest of the map still applies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from gateway.agent.backend import IPNetwork, format_endpoint, network, parse_endpoint
from gateway.errors import BadKey
from gateway.model import NetMap, Peer
from gateway.wgkey import encode_key, parse_public_key, public_from_private

__all__ = [
    "DesiredConfig",
    "DesiredDevice",
    "DesiredLink",
    "DesiredPeer",
    "LocalSettings",
    "build_desired",
    "check_endpoint",
]

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
_METADATA = ipaddress.ip_address("169.254.169.254")


@dataclass(frozen=True, slots=True)
class LocalSettings:
    """What the host decides, not the control plane."""

    private_key: bytes = field(repr=False)
    listen_port: int
    fwmark: int
    table: int
    rule_priority: int
    mtu: int
    allow_default_route: bool = False


@dataclass(frozen=True, slots=True)
class DesiredPeer:
    """A validated peer."""

    public_key: str
    allowed_ips: frozenset[IPNetwork]
    endpoint: str | None = None
    keepalive: int = 0


@dataclass(frozen=True, slots=True)
class DesiredDevice:
    """The WireGuard device as it should be."""

    private_key: bytes = field(repr=False)
    listen_port: int
    fwmark: int
    peers: Mapping[str, DesiredPeer] = field(default_factory=dict)

    @property
    def public_key(self) -> str:
        """Base64 public key of :attr:`private_key`."""
        return encode_key(public_from_private(self.private_key))


@dataclass(frozen=True, slots=True)
class DesiredLink:
    """Addresses, routes (all to the interface, in ``table``), the policy rule and the MTU."""

    addresses: frozenset[IPInterface]
    routes: frozenset[IPNetwork]
    table: int
    rule_priority: int
    fwmark: int
    mtu: int


@dataclass(frozen=True, slots=True)
class DesiredConfig:
    """The result of :func:`build_desired`."""

    device: DesiredDevice
    link: DesiredLink
    problems: tuple[str, ...] = ()


@lru_cache(maxsize=1 << 14)
def check_endpoint(text: str) -> str:
    """Validate an endpoint from the control plane: its canonical form, or ValueError."""
    address, port = parse_endpoint(text)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bad = (
        address.is_loopback
        or address.is_unspecified
        or address.is_multicast
        or address.is_link_local
        or address == _METADATA
        or (address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"))
    )
    if bad:
        raise ValueError(f"endpoint {text} is loopback/unspecified/multicast/link-local/metadata")
    return format_endpoint(address, port)


def build_desired(netmap: NetMap, settings: LocalSettings) -> DesiredConfig:
    """Validate ``netmap`` and compute the desired device and link state."""
    problems: list[str] = []
    addresses = _self_addresses(netmap.self_view.addresses, problems)
    own_key = encode_key(public_from_private(settings.private_key))
    candidates = _check_peers(netmap.peers.values(), settings, own_key, problems)
    candidates = _drop_duplicates(candidates, problems)
    peers = _drop_overlaps(candidates, addresses, problems)
    device = DesiredDevice(
        private_key=settings.private_key,
        listen_port=settings.listen_port,
        fwmark=settings.fwmark,
        peers={p.public_key: p for p in peers.values()},
    )
    link = DesiredLink(
        addresses=frozenset(addresses),
        routes=frozenset(net for p in peers.values() for net in p.allowed_ips),
        table=settings.table,
        rule_priority=settings.rule_priority,
        fwmark=settings.fwmark,
        mtu=settings.mtu,
    )
    return DesiredConfig(device=device, link=link, problems=tuple(problems))


def _self_addresses(texts: Iterable[str], problems: list[str]) -> list[IPInterface]:
    result: list[IPInterface] = []
    for text in texts:
        try:
            result.append(ipaddress.ip_interface(text))
        except ValueError:
            problems.append(f"self: address {text!r} is not an IP prefix; ignored")
    return result


def _check_peers(
    peers: Iterable[Peer], settings: LocalSettings, own_key: str, problems: list[str]
) -> dict[str, DesiredPeer]:
    """Per-peer checks; the result is keyed by device id."""
    result: dict[str, DesiredPeer] = {}
    for peer in sorted(peers, key=lambda p: p.id):
        try:
            result[peer.id] = _check_peer(peer, settings.allow_default_route, own_key)
        except (BadKey, ValueError) as exc:
            problems.append(f"peer {peer.id} ({peer.name}) refused: {exc}")
    return result


@lru_cache(maxsize=1 << 14)
def _check_peer(peer: Peer, allow_default_route: bool, own_key: str) -> DesiredPeer:
    """Validate one peer (memoized: a map mostly repeats the peers of the previous one)."""
    key = parse_public_key(peer.public_key)
    if key == own_key:
        raise ValueError("public key is this device's own key")
    allowed = frozenset(network(a) for a in peer.allowed_ips)
    if not allow_default_route and any(n.prefixlen == 0 for n in allowed):
        raise ValueError("allowed IPs include a default route (0.0.0.0/0 or ::/0)")
    endpoints = [check_endpoint(e) for e in peer.endpoints]
    keepalive = peer.keepalive or 0
    if not 0 <= keepalive < 65536:
        raise ValueError(f"keepalive {keepalive} out of range")
    endpoint = endpoints[0] if endpoints else None
    return DesiredPeer(public_key=key, allowed_ips=allowed, endpoint=endpoint, keepalive=keepalive)


def _drop_duplicates(peers: dict[str, DesiredPeer], problems: list[str]) -> dict[str, DesiredPeer]:
    owners: dict[str, list[str]] = {}
    for device_id, peer in peers.items():
        owners.setdefault(peer.public_key, []).append(device_id)
    result = dict(peers)
    for key, ids in owners.items():
        if len(ids) > 1:
            for device_id in ids:
                del result[device_id]
            problems.append(f"peers {', '.join(ids)} refused: duplicate public key {key}")
    return result


def _drop_overlaps(
    peers: dict[str, DesiredPeer], own: list[IPInterface], problems: list[str]
) -> dict[str, DesiredPeer]:
    """Drop every peer whose allowed IPs overlap another peer's or our own addresses."""
    # A default route (only here if allowed) is an exit node: it overlaps everything by design.
    entries = [
        (net, device_id) for device_id, p in peers.items() for net in p.allowed_ips if net.prefixlen
    ]
    entries += [(a.network, "") for a in own]  # "" = this device
    clashes = _overlapping_pairs(entries)
    result = dict(peers)
    for device_id in sorted({i for pair in clashes for i in pair if i}):
        others = sorted({o for pair in clashes if device_id in pair for o in pair} - {device_id})
        names = ", ".join(o or "this device's addresses" for o in others)
        problems.append(f"peer {device_id} refused: allowed IPs overlap {names}")
        del result[device_id]
    return result


def _overlapping_pairs(entries: list[tuple[IPNetwork, str]]) -> set[tuple[str, str]]:
    """Owner pairs with overlapping prefixes, in O(n log n + overlaps).

    Prefixes either nest or are disjoint, so a sweep over sorted prefixes with a
    stack of the prefixes still "open" finds every containment.
    """
    clashes: set[tuple[str, str]] = set()
    for version in (4, 6):
        same = [(n, o) for n, o in entries if n.version == version]
        same.sort(key=lambda e: (int(e[0].network_address), e[0].prefixlen))
        stack: list[tuple[int, str]] = []  # (last address, owner)
        for net, owner in same:
            start = int(net.network_address)
            while stack and stack[-1][0] < start:
                stack.pop()
            clashes.update((min(o, owner), max(o, owner)) for _, o in stack if o != owner)
            stack.append((int(net.broadcast_address), owner))
    return clashes

"""NetMap + local settings -> the configuration the host should have (pure).

Everything that comes from the control plane is validated here (SECURITY.md,
"Agent and data plane"). An offending peer is dropped and reported in
``DesiredConfig.problems``; the rest of the map still applies.

Routes: the tunnel address pool of the map's self view (one prefix per family,
each holding this device's own address) is routed as one prefix, as Tailscale
routes 100.64.0.0/10 to its interface; a peer's allowed IP needs a route of its
own only outside the pool (pod and Service CIDRs, advertised subnets). A map
without a pool (an older gateway) gets a route per allowed IP. WireGuard itself
picks the peer, and answers "unreachable" for a pool address no peer holds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from agent.dataplane.backend import IPNetwork, network
from wiregate import net
from wiregate.errors import BadKey
from wiregate.intervals import OverlapIndex, Span
from wiregate.keys import encode_key, parse_public_key, public_from_private
from wiregate.model import NetMap, Peer, SelfView

__all__ = [
    "DesiredBuilder",
    "DesiredConfig",
    "DesiredDevice",
    "DesiredLink",
    "DesiredPeer",
    "LocalSettings",
    "build_desired",
    "check_endpoint",
    "outside_pool",
    "pool_prefixes",
]

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
_SELF = "\x00self"  # the owner of this device's addresses in the overlap index (no device id)


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
    """Addresses, routes (all to the interface, in ``table``), the policy rule and the MTU.

    ``routes`` holds the pool's prefixes and the peers' allowed IPs outside them.
    """

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
    """Validate an endpoint from the control plane: its canonical form, or ValueError.

    The same rule as the relay's and the gateway's (:func:`wiregate.net.parse_endpoint`
    with ``from_peer``): an address no peer may be sent to is refused.
    """
    return str(net.parse_endpoint(text, allow_names=False, from_peer=True, error=ValueError))


def build_desired(netmap: NetMap, settings: LocalSettings) -> DesiredConfig:
    """Validate ``netmap`` and compute the desired device and link state."""
    return DesiredBuilder(settings).build(netmap)


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


@lru_cache(maxsize=1 << 14)
def _spans(allowed: frozenset[IPNetwork]) -> tuple[Span, ...]:
    # A default route (only here if allowed) is an exit node: it overlaps everything by design.
    return tuple((n.version, int(n.network_address), n.prefixlen) for n in allowed if n.prefixlen)


def _self_addresses(texts: Iterable[str]) -> tuple[frozenset[IPInterface], tuple[str, ...]]:
    result: set[IPInterface] = set()
    problems: list[str] = []
    for text in texts:
        try:
            result.add(ipaddress.ip_interface(text))
        except ValueError:
            problems.append(f"self: address {text!r} is not an IP prefix; ignored")
    return frozenset(result), tuple(problems)


def pool_prefixes(
    texts: Iterable[str], addresses: Iterable[IPInterface]
) -> tuple[frozenset[IPNetwork], tuple[str, ...]]:
    """The pool prefixes routed as one, and why others are not (they then get a route per
    peer): a prefix must be a CIDR, not a default route, and hold this device's address."""
    result: set[IPNetwork] = set()
    problems: list[str] = []
    own = [a.ip for a in addresses]
    for text in texts:
        try:
            prefix = network(text)
        except ValueError:
            problems.append(f"self: pool {text!r} is not a CIDR; ignored")
            continue
        if prefix.prefixlen == 0:
            problems.append(f"self: pool {text} is a default route; ignored")
        elif not any(a.version == prefix.version and a in prefix for a in own):
            problems.append(f"self: pool {text} does not hold this device's address; ignored")
        else:
            result.add(prefix)
    return frozenset(result), tuple(problems)


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    if inner.version != outer.version or inner.prefixlen < outer.prefixlen:
        return False
    shift = outer.max_prefixlen - outer.prefixlen
    return int(inner.network_address) >> shift == int(outer.network_address) >> shift


@lru_cache(maxsize=1 << 14)
def outside_pool(allowed: frozenset[IPNetwork], pool: frozenset[IPNetwork]) -> frozenset[IPNetwork]:
    """The prefixes of ``allowed`` that need a route of their own: those no pool prefix
    holds (memoized: a peer's allowed IPs and the pool are the same objects map after map)."""
    if not pool:
        return allowed
    return frozenset(n for n in allowed if not any(_within(n, p) for p in pool))


class DesiredBuilder:
    """Builds the desired configuration of successive maps, re-checking only what changed.

    Per-peer results are kept by device id and ``Peer`` value; duplicate keys and
    allowed-IP overlaps are maintained incrementally (:class:`OverlapIndex`), so
    a map that differs from the previous one by a peer costs little more than
    comparing the two maps. An unchanged map returns the previous result itself.
    """

    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings
        self._own_key = encode_key(public_from_private(settings.private_key))
        self._seen: dict[str, Peer] = {}  # device id -> last peer value
        self._candidates: dict[str, DesiredPeer] = {}  # passed the per-peer checks
        self._refused: dict[str, str] = {}  # device id -> why
        self._by_key: dict[str, set[str]] = {}  # public key -> candidate device ids
        self._index = OverlapIndex()  # eligible candidates (unique key) and our addresses
        self._accepted: dict[str, DesiredPeer] = {}  # device id -> peer
        self._by_public: dict[str, DesiredPeer] = {}  # public key -> accepted peer
        self._self_texts: tuple[str, ...] | None = None
        self._addresses: frozenset[IPInterface] = frozenset()
        self._self_problems: tuple[str, ...] = ()
        self._pool_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._pool: frozenset[IPNetwork] = frozenset()  # routed as one prefix per family
        self._pool_problems: tuple[str, ...] = ()
        self._config: DesiredConfig | None = None

    def build(self, netmap: NetMap) -> DesiredConfig:
        """The desired configuration for ``netmap`` (the previous result if nothing changed)."""
        changed = self._changed(netmap.peers)
        affected = self._set_self(netmap.self_view)
        if self._config is not None and not changed and not affected:
            return self._config
        affected |= self._reindex(self._recheck(changed, netmap.peers))
        self._settle(affected)
        self._config = self._assemble()
        return self._config

    def _changed(self, peers: Mapping[str, Peer]) -> list[str]:
        seen = self._seen
        ids = [i for i, p in peers.items() if (old := seen.get(i)) is not p and old != p]
        ids.extend(seen.keys() - peers.keys())
        return ids

    def _set_self(self, view: SelfView) -> set[str]:
        """Take this device's addresses and pool; return the ids they affect (with
        ``_SELF`` if the config must be assembled anew)."""
        affected: set[str] = set()
        texts = view.addresses
        if texts != self._self_texts:
            self._self_texts = texts
            self._addresses, self._self_problems = _self_addresses(texts)
            spans = [
                (a.version, int(a.network.network_address), a.network.prefixlen)
                for a in self._addresses
            ]
            affected = self._index.assign(_SELF, spans)
        if (texts, view.pool) != self._pool_key:
            self._pool_key = (texts, view.pool)
            self._pool, self._pool_problems = pool_prefixes(view.pool, self._addresses)
            affected.add(_SELF)
        return affected

    def _recheck(self, ids: list[str], peers: Mapping[str, Peer]) -> set[str]:
        """Run the per-peer checks on ``ids``; return the ids whose eligibility may change."""
        touched: set[str] = set()
        for device_id in ids:
            touched.add(device_id)
            self._refused.pop(device_id, None)
            old = self._candidates.pop(device_id, None)
            if old is not None:
                touched |= self._unkey(device_id, old.public_key)
            peer = peers.get(device_id)
            if peer is None:
                del self._seen[device_id]
                continue
            self._seen[device_id] = peer
            try:
                new = _check_peer(peer, self.settings.allow_default_route, self._own_key)
            except (BadKey, ValueError) as exc:
                self._refused[device_id] = f"peer {peer.id} ({peer.name}) refused: {exc}"
                continue
            self._candidates[device_id] = new
            group = self._by_key.setdefault(new.public_key, set())
            group.add(device_id)
            touched |= group
        return touched

    def _unkey(self, device_id: str, key: str) -> set[str]:
        group = self._by_key[key]
        group.discard(device_id)
        if not group:
            del self._by_key[key]
        return set(group)

    def _reindex(self, ids: set[str]) -> set[str]:
        """Put the eligible (unique key) candidates among ``ids`` in the index, the rest out."""
        affected: set[str] = set()
        eligible: dict[str, tuple[Span, ...]] = {}
        for device_id in ids:
            peer = self._candidates.get(device_id)
            if peer is None or len(self._by_key[peer.public_key]) > 1:
                affected |= self._index.remove(device_id)
            else:
                eligible[device_id] = _spans(peer.allowed_ips)
        return affected | self._index.assign_many(eligible)

    def _settle(self, ids: set[str]) -> None:
        """Accept or drop each of ``ids`` by its checks and clashes: all drops, then all adds.

        Two phases, because a public key can move from one device id to another.
        """
        index, arriving = self._index, []
        for device_id in ids:
            peer = self._candidates.get(device_id)
            ok = peer is not None and device_id in index and device_id not in index.clashes
            old = self._accepted.get(device_id)
            if old is not None and (old is not peer or not ok):
                self._drop(device_id, old)
            if ok and peer is not None and old is not peer:
                arriving.append((device_id, peer))
        for device_id, peer in arriving:
            self._accepted[device_id] = self._by_public[peer.public_key] = peer

    def _drop(self, device_id: str, old: DesiredPeer) -> None:
        del self._accepted[device_id], self._by_public[old.public_key]

    def _assemble(self) -> DesiredConfig:
        settings = self.settings
        device = DesiredDevice(
            private_key=settings.private_key,
            listen_port=settings.listen_port,
            fwmark=settings.fwmark,
            peers=dict(self._by_public),
        )
        link = DesiredLink(
            addresses=self._addresses,
            routes=self._routes(),
            table=settings.table,
            rule_priority=settings.rule_priority,
            fwmark=settings.fwmark,
            mtu=settings.mtu,
        )
        return DesiredConfig(device=device, link=link, problems=self._problems())

    def _routes(self) -> frozenset[IPNetwork]:
        """The pool's prefixes and every accepted peer's allowed IPs outside them."""
        pool, peers = self._pool, self._accepted.values()
        if not pool:
            return frozenset().union(*[p.allowed_ips for p in peers])
        return pool.union(*[outside_pool(p.allowed_ips, pool) for p in peers])

    def _problems(self) -> tuple[str, ...]:
        problems = [*self._self_problems, *self._pool_problems]
        problems.extend(self._refused[i] for i in sorted(self._refused))
        groups = sorted(sorted(g) for g in self._by_key.values() if len(g) > 1)
        for ids in groups:
            key = self._candidates[ids[0]].public_key
            problems.append(f"peers {', '.join(ids)} refused: duplicate public key {key}")
        for device_id, others in sorted(self._index.clashes.items()):
            if device_id != _SELF:
                names = ", ".join(_name(o) for o in sorted(others))
                problems.append(f"peer {device_id} refused: allowed IPs overlap {names}")
        return tuple(problems)


def _name(owner: str) -> str:
    return "this device's addresses" if owner == _SELF else owner

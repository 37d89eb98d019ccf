"""The small interface every WireGuard backend implements, its values and an in-memory fake.

Two backends implement :class:`WireGuardBackend`: the kernel module over generic
netlink (:mod:`agent.dataplane.netlink`) and wireguard-go/boringtun over the
cross-platform UAPI socket (:mod:`agent.dataplane.uapi`). The reconciler
(:mod:`agent.dataplane.reconcile`) only ever sees these values.

Endpoints are canonical text: ``"192.0.2.1:51820"`` or ``"[2001:db8::1]:51820"``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from wiregate import net
from wiregate.errors import DataPlaneError
from wiregate.keys import encode_key, public_from_private

__all__ = [
    "DeviceUpdate",
    "IPNetwork",
    "LiveDevice",
    "LivePeer",
    "MemoryBackend",
    "PeerUpdate",
    "WireGuardBackend",
    "format_endpoint",
    "network",
    "network_from_packed",
    "network_text",
    "parse_endpoint",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = net.IPAddress


_INTERN_MAX = 1 << 16
_interned: dict[tuple[int, int, int], IPNetwork] = {}


def _interned_network(version: int, value: int, prefixlen: int) -> IPNetwork:
    """The one shared object for a prefix, so that set operations compare by identity.

    Raises ValueError if ``value`` has host bits set (like ``ip_network(strict=True)``).
    """
    key = (version, value, prefixlen)
    found = _interned.get(key)
    if found is None:
        kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        found = kind((value, prefixlen))
        if len(_interned) >= _INTERN_MAX:
            _interned.clear()  # only costs sharing, never correctness
        _interned[key] = found
    return found


@lru_cache(maxsize=1 << 16)
def network(text: str) -> IPNetwork:
    """Parse a CIDR strictly (no host bits); memoized, as maps repeat the same prefixes.

    ``inet_pton`` handles the plain forms (a strict subset of what ``ipaddress``
    accepts); anything else goes through ``ipaddress``, which defines the rules.
    """
    address, sep, length = text.partition("/")
    version, family = (6, socket.AF_INET6) if ":" in address else (4, socket.AF_INET)
    bits = 32 if version == 4 else 128
    try:
        value = int.from_bytes(socket.inet_pton(family, address), "big")
    except (OSError, ValueError, UnicodeError):
        value = -1
    plain = length.isascii() and length.isdigit() if sep else True
    prefixlen = (int(length) if sep else bits) if plain else -1
    if value < 0 or not 0 <= prefixlen <= bits:
        parsed = ipaddress.ip_network(text, strict=True)
        version, value, prefixlen = parsed.version, int(parsed.network_address), parsed.prefixlen
    return _interned_network(version, value, prefixlen)


def network_from_packed(packed: bytes, prefixlen: int) -> IPNetwork:
    """The network of a packed address and prefix length (as netlink reports it)."""
    version, bits = (4, 32) if len(packed) == 4 else (6, 128)
    if not 0 <= prefixlen <= bits:
        raise ValueError(f"prefix length {prefixlen} out of range")
    value = int.from_bytes(packed, "big") >> (bits - prefixlen) << (bits - prefixlen)
    return _interned_network(version, value, prefixlen)


@lru_cache(maxsize=1 << 16)
def network_text(net: IPNetwork) -> str:
    """``str(net)``, memoized (the UAPI and netlink encoders repeat the same prefixes)."""
    return str(net)


@lru_cache(maxsize=1 << 14)
def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """Split ``ip:port`` / ``[ip6]:port`` into an address and a port; ValueError if malformed.

    The grammar of :func:`wiregate.net.parse_endpoint`; which addresses a peer may
    name is decided where the map is validated, not here (the device reports
    whatever endpoint it has, and a relay may be on loopback in tests).
    """
    endpoint = net.parse_endpoint(text, allow_names=False, from_peer=False, error=ValueError)
    assert endpoint.ip is not None  # allow_names=False: always an address
    return endpoint.ip, endpoint.port


def format_endpoint(address: IPAddress, port: int) -> str:
    """The canonical text of an endpoint."""
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


@dataclass(frozen=True, slots=True)
class LivePeer:
    """One peer as the WireGuard device reports it."""

    public_key: str
    allowed_ips: frozenset[IPNetwork] = frozenset()
    endpoint: str | None = None
    keepalive: int = 0
    last_handshake: float | None = None  # POSIX seconds, None if never
    rx: int = 0
    tx: int = 0


@dataclass(frozen=True, slots=True)
class LiveDevice:
    """The whole device as read back (the private key itself is never kept)."""

    public_key: str | None = None  # derived from the private key; None if unset
    listen_port: int = 0
    fwmark: int = 0
    peers: Mapping[str, LivePeer] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """Changes for one peer. ``None`` fields are left untouched.

    ``update_only`` marks a change to an existing peer (a backend must not create
    the peer if it vanished meanwhile). ``allowed_ips`` replaces the peer's set.
    """

    public_key: str
    remove: bool = False
    update_only: bool = False
    allowed_ips: frozenset[IPNetwork] | None = None
    endpoint: str | None = None
    keepalive: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """One reconcile's worth of device changes; empty means nothing to write."""

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    peers: tuple[PeerUpdate, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when applying this update would change nothing."""
        device = (self.private_key, self.listen_port, self.fwmark)
        return all(v is None for v in device) and not self.peers


class WireGuardBackend(Protocol):
    """What the data plane needs from a WireGuard implementation."""

    name: str

    def exists(self, name: str) -> bool:
        """True if the interface exists and answers."""
        ...

    def create(self, name: str) -> None:
        """Create the interface (or adopt a running one)."""
        ...

    def delete(self, name: str) -> None:
        """Remove the interface; no error if it is already gone."""
        ...

    def read(self, name: str) -> LiveDevice:
        """Read the device's current configuration and peer statistics."""
        ...

    def write(self, name: str, update: DeviceUpdate) -> int:
        """Apply ``update``; return the number of write operations issued (0 if empty)."""
        ...

    def begin_write(self, name: str, update: DeviceUpdate) -> Callable[[], int]:
        """Start applying ``update``; the returned function finishes it (``write``'s count).

        Lets the caller do other work (routes) while the WireGuard implementation
        works; a backend that cannot overlap does everything here.
        """
        ...


def apply_update(live: LiveDevice, update: DeviceUpdate, public_key: str | None) -> LiveDevice:
    """What a WireGuard device looks like after ``update`` (the semantics both backends follow).

    ``public_key`` is the public key of ``update.private_key`` (computed by the caller).
    """
    peers = dict(live.peers)
    for change in update.peers:
        current = peers.get(change.public_key)
        if change.remove:
            peers.pop(change.public_key, None)
        elif current is not None or not change.update_only:
            peers[change.public_key] = _apply_peer(current, change)
    return LiveDevice(
        public_key=live.public_key if update.private_key is None else public_key,
        listen_port=_pick(update.listen_port, live.listen_port),
        fwmark=_pick(update.fwmark, live.fwmark),
        peers=peers,
    )


def _pick(new: int | None, old: int) -> int:
    return old if new is None else new


def _apply_peer(current: LivePeer | None, change: PeerUpdate) -> LivePeer:
    peer = current or LivePeer(public_key=change.public_key)
    return LivePeer(
        public_key=peer.public_key,
        allowed_ips=peer.allowed_ips if change.allowed_ips is None else change.allowed_ips,
        endpoint=peer.endpoint if change.endpoint is None else change.endpoint,
        keepalive=peer.keepalive if change.keepalive is None else change.keepalive,
        last_handshake=peer.last_handshake,
        rx=peer.rx,
        tx=peer.tx,
    )


class MemoryBackend:
    """An in-memory WireGuard backend for tests: it counts writes like the real ones."""

    name = "memory"

    def __init__(self) -> None:
        self.devices: dict[str, LiveDevice] = {}
        self.writes = 0
        self.reads = 0
        self.log: list[tuple[str, DeviceUpdate]] = []  # every non-empty update written

    def exists(self, name: str) -> bool:
        return name in self.devices

    def create(self, name: str) -> None:
        self.devices.setdefault(name, LiveDevice())

    def delete(self, name: str) -> None:
        self.devices.pop(name, None)

    def read(self, name: str) -> LiveDevice:
        self.reads += 1
        return self._device(name)

    def _device(self, name: str) -> LiveDevice:
        try:
            return self.devices[name]
        except KeyError:
            raise DataPlaneError(f"no WireGuard interface {name}") from None

    def write(self, name: str, update: DeviceUpdate) -> int:
        if update.is_empty:
            return 0
        public = None
        if update.private_key is not None:
            public = encode_key(public_from_private(update.private_key))
        self.devices[name] = apply_update(self._device(name), update, public)
        self.writes += 1
        self.log.append((name, update))
        return 1

    def begin_write(self, name: str, update: DeviceUpdate) -> Callable[[], int]:
        count = self.write(name, update)
        return lambda: count

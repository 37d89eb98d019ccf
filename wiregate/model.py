"""Values shared by the gateway and the agent: devices, peers and the map wire format.

The network map travels over the agent's WebSocket stream as JSON text frames:

``full``   ``{"type": "full", "version": V, "self": SELF, "peers": [PEER, ...]}``
``delta``  ``{"type": "delta", "base": B, "version": V, "self": SELF|null,
             "upsert": [PEER, ...], "remove": [device_id, ...]}``
           applies only on top of version ``B``; an agent at another version
           reconnects with ``?since=<its version>`` and gets a full map.
``sync``   ``{"type": "sync", "version": V}``: nothing changed since ``V``.
``revoked`` ``{"type": "revoked", "reason": "..."}``: this device was removed;
           the agent tears its interface down.

The agent sends ``{"type": "endpoints", "endpoints": ["ip:port", ...]}`` when its
candidate endpoints change.

PEER is :meth:`Peer.to_wire`, SELF is :meth:`SelfView.to_wire`. Optional fields
are sent only when they say something, and readers ignore fields they do not
know, so older agents keep working: a PEER's ``"filter": ["tcp:5432", "icmp"]``
lists what that peer may open on the receiving device (absent: everything;
``[]``: nothing, only replies); SELF's ``"refused_routes"`` lists the device's
advertised routes the policy did not approve (its peers do not get them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Device", "Identity", "NetMap", "Peer", "SelfView", "apply_delta"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a device belongs to: an (issuer, subject) pair, never an email alone.

    Enrollment keys use the issuer ``wiregate:enrollment-key`` and the key's id as
    subject; OIDC identities use the token's ``iss`` and ``sub``.
    """

    issuer: str
    subject: str


@dataclass(frozen=True, slots=True)
class Device:
    """A device as the control plane knows it (one row of the store, as a value).

    ``ipv4``/``ipv6`` are bare tunnel addresses ("100.64.0.7", "fd7a:7767:6174::7");
    ``routes`` are CIDRs the device advertises (pod CIDRs, subnets behind it).
    Times are POSIX seconds (UTC).
    """

    id: str
    name: str
    public_key: str
    identity: Identity
    ipv4: str
    ipv6: str
    tags: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    keepalive: int | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    previous_public_key: str | None = None  # the key its last rotation replaced
    groups: tuple[str, ...] = ()  # policy groups of its owner at enrollment (never sent)
    nat: str | None = None  # NAT type its agent measured: open, eim, symmetric, udp-blocked

    def tunnel_cidrs(self) -> tuple[str, ...]:
        return (f"{self.ipv4}/32", f"{self.ipv6}/128")

    def to_peer(self) -> Peer:
        cidrs = self.tunnel_cidrs()
        return Peer(
            id=self.id,
            name=self.name,
            public_key=self.public_key,
            addresses=cidrs,
            allowed_ips=cidrs + self.routes,
            endpoints=self.endpoints,
            keepalive=self.keepalive,
            tags=self.tags,
            nat=self.nat,
        )

    def to_self(self) -> SelfView:
        return SelfView(
            id=self.id,
            name=self.name,
            public_key=self.public_key,
            addresses=self.tunnel_cidrs(),
            tags=self.tags,
            expires_at=self.expires_at,
            previous_public_key=self.previous_public_key,
        )


@dataclass(frozen=True, slots=True)
class Peer:
    """One peer as an agent sees it (the same for every viewer)."""

    id: str
    name: str
    public_key: str
    addresses: tuple[str, ...]  # tunnel addresses, "100.64.0.2/32", "fd..::2/128"
    allowed_ips: tuple[str, ...]  # addresses + advertised routes
    endpoints: tuple[str, ...] = ()  # "192.0.2.2:51820", "[2001:db8::1]:51820"
    keepalive: int | None = None
    tags: tuple[str, ...] = ()
    filter: tuple[str, ...] | None = None  # what this peer may open on the viewer; None: all
    nat: str | None = None  # the peer's NAT type as its agent measured it; None: unknown

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "public_key": self.public_key,
            "addresses": list(self.addresses),
            "allowed_ips": list(self.allowed_ips),
            "endpoints": list(self.endpoints),
            "keepalive": self.keepalive,
            "tags": list(self.tags),
        }
        if self.nat is not None:
            wire["nat"] = self.nat
        if self.filter is not None:
            wire["filter"] = list(self.filter)
        return wire

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Peer:
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            public_key=str(data["public_key"]),
            addresses=tuple(str(a) for a in data["addresses"]),
            allowed_ips=tuple(str(a) for a in data["allowed_ips"]),
            endpoints=tuple(str(e) for e in data.get("endpoints") or ()),
            keepalive=None if data.get("keepalive") is None else int(data["keepalive"]),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            filter=None if data.get("filter") is None else tuple(str(f) for f in data["filter"]),
            nat=None if data.get("nat") is None else str(data["nat"]),
        )


@dataclass(frozen=True, slots=True)
class SelfView:
    """What an agent needs to know about its own device.

    ``public_key`` is the key the network uses for this device. After a key
    rotation it is the device's next key and ``previous_public_key`` the key it
    replaces: "switch now". Every peer's entry changed in the same map version,
    so the agent switches its interface's private key on receiving it.
    ``expires_at`` (POSIX seconds) is when the key stops being accepted.
    """

    id: str
    name: str
    public_key: str
    addresses: tuple[str, ...]
    tags: tuple[str, ...] = ()
    expires_at: float | None = None
    previous_public_key: str | None = None
    refused_routes: tuple[str, ...] = ()  # advertised routes the policy did not approve

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "public_key": self.public_key,
            "addresses": list(self.addresses),
            "tags": list(self.tags),
        }
        if self.refused_routes:
            wire["refused_routes"] = list(self.refused_routes)
        if self.expires_at is not None:
            wire["expires_at"] = self.expires_at
        if self.previous_public_key is not None:
            wire["previous_public_key"] = self.previous_public_key
        return wire

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SelfView:
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            public_key=str(data["public_key"]),
            addresses=tuple(str(a) for a in data["addresses"]),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            refused_routes=tuple(str(r) for r in data.get("refused_routes") or ()),
            expires_at=_optional_float(data.get("expires_at")),
            previous_public_key=_optional_str(data.get("previous_public_key")),
        )


@dataclass(frozen=True, slots=True)
class NetMap:
    """An agent's whole view at one version."""

    version: int
    self_view: SelfView
    peers: dict[str, Peer] = field(default_factory=dict)  # by device id

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "full",
            "version": self.version,
            "self": self.self_view.to_wire(),
            "peers": [p.to_wire() for p in self.peers.values()],
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> NetMap:
        peers = (Peer.from_wire(p) for p in data["peers"])
        return cls(
            version=int(data["version"]),
            self_view=SelfView.from_wire(data["self"]),
            peers={p.id: p for p in peers},
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def apply_delta(current: NetMap, delta: dict[str, Any]) -> NetMap:
    """Apply a ``delta`` message to ``current``; raise ValueError on a version gap."""
    if int(delta["base"]) != current.version:
        raise ValueError(f"delta base {delta['base']} does not follow version {current.version}")
    peers = dict(current.peers)
    for device_id in delta.get("remove") or ():
        peers.pop(str(device_id), None)
    for raw in delta.get("upsert") or ():
        peer = Peer.from_wire(raw)
        peers[peer.id] = peer
    self_raw = delta.get("self")
    self_view = SelfView.from_wire(self_raw) if self_raw else current.self_view
    return NetMap(version=int(delta["version"]), self_view=self_view, peers=peers)

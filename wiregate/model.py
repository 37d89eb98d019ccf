"""Values shared by the gateway and the agent: devices, peers, the network map.

Their wire format on the map stream is :mod:`wiregate.mapwire`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Device", "DnsConfig", "Identity", "NetMap", "Peer", "SelfView"]


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
    # pod identity (per viewer, sorted by address): ("10.244.1.5", ("tcp:5432",)) in
    # pods_from: that pod of this peer may open these on the viewer, beyond ``filter``;
    # in pods_to: this peer may open these on that pod of the viewer's own
    pods_from: tuple[tuple[str, tuple[str, ...]], ...] = ()
    pods_to: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """The mesh's names, as the gateway tells every agent (``docs/names.md``).

    Each device is ``NAME.domain``; ``zones`` are split-DNS zones, each with the
    nameservers (bare IP addresses, reached over the tunnel) that answer for it,
    sorted by zone.
    """

    domain: str
    zones: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class SelfView:
    """What an agent needs to know about its own device.

    ``public_key`` is the key the network uses for this device. After a key
    rotation it is the device's next key and ``previous_public_key`` the key it
    replaces: "switch now". Every peer's entry changed in the same map version,
    so the agent switches its interface's private key on receiving it.
    ``expires_at`` (POSIX seconds) is when the key stops being accepted.
    ``pool`` is the tunnel address pool the gateway allocates from, one prefix per
    family ("100.64.0.0/16", "fd7a:7767:6174::/64"): every device's tunnel
    addresses are in it, so the agent routes it as one prefix to its interface
    instead of a route per peer. Empty (a gateway that does not send it): a
    route per peer.
    """

    id: str
    name: str
    public_key: str
    addresses: tuple[str, ...]
    tags: tuple[str, ...] = ()
    expires_at: float | None = None
    previous_public_key: str | None = None
    refused_routes: tuple[str, ...] = ()  # advertised routes the policy did not approve
    dns: DnsConfig | None = None  # the mesh domain and split-DNS zones; None: no names
    pool: tuple[str, ...] = ()  # the tunnel address pool, one CIDR per family; (): not sent


@dataclass(frozen=True, slots=True)
class NetMap:
    """An agent's whole view at one version."""

    version: int
    self_view: SelfView
    peers: dict[str, Peer] = field(default_factory=dict)  # by device id

"""The data plane facade the agent daemon calls (synchronous; wrap in asyncio.to_thread).

``setup`` picks a backend (kernel if the kernel can create a WireGuard link,
else userspace), creates or adopts the interface and sets key, port, fwmark,
MTU, link up and the policy rule, without touching existing peers (an agent
restart keeps the tunnels). ``apply`` validates a network map and reconciles
the device and link layer incrementally. ``teardown`` removes everything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.agent.backend import WireGuardBackend
from gateway.agent.desired import DesiredDevice, DesiredLink, LocalSettings, build_desired
from gateway.agent.mtu import DEFAULT_UNDERLAY_MTU, tunnel_mtu, underlay_mtu
from gateway.agent.netlink import KernelUnsupported, NetlinkBackend
from gateway.agent.reconcile import diff
from gateway.agent.routes import LinkManager, RuleSpec, diff_links
from gateway.agent.uapi import UapiBackend
from gateway.errors import ConfigError, DataPlaneError
from gateway.model import NetMap

__all__ = ["ApplyResult", "DataPlane", "PeerStatus"]

_IFNAME = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9_=+.-]{0,14}$")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one ``apply`` did: writes issued, peers refused (with why), peers configured."""

    writes: int
    problems: tuple[str, ...]
    peers: int


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A live peer: where it is, when it last shook hands (POSIX s), bytes moved."""

    public_key: str
    endpoint: str | None
    last_handshake: float | None
    rx: int
    tx: int
    allowed_ips: tuple[str, ...]


class DataPlane:
    """One WireGuard interface with its addresses, routes, rule and MTU."""

    backend_name: str

    def __init__(
        self,
        *,
        interface: str,
        private_key: bytes,
        listen_port: int,
        fwmark: int,
        table: int,
        rule_priority: int,
        mtu: int = 0,
        backend: str = "auto",
        userspace_binary: str = "wireguard-go",
        run_dir: Path,
        allow_default_route: bool = False,
    ) -> None:
        _check_config(interface, fwmark, backend, private_key)
        self.interface = interface
        self.settings = LocalSettings(
            private_key=private_key,
            listen_port=listen_port,
            fwmark=fwmark,
            table=table,
            rule_priority=rule_priority,
            mtu=mtu,
            allow_default_route=allow_default_route,
        )
        self.rule = RuleSpec(table=table, priority=rule_priority, fwmark=fwmark)
        self.requested_backend = backend
        self.userspace = UapiBackend(run_dir=run_dir, binary=userspace_binary)
        self.backend_name = "none"
        self._backend: WireGuardBackend | None = None
        self._links: LinkManager | None = None
        self._last: DesiredDevice | None = None

    # --- lifecycle ---------------------------------------------------------

    def setup(self) -> None:
        """Create or adopt the interface; set key, port, fwmark, MTU, up and the rule."""
        self._links = self._links or LinkManager()
        self._backend = self._choose_backend(self._links)
        self.backend_name = self._backend.name
        live = self._backend.read(self.interface)
        device = DesiredDevice(
            self.settings.private_key, self.settings.listen_port, self.settings.fwmark, peers={}
        )
        self._backend.write(self.interface, replace(diff(device, live, None), peers=()))
        link = self._links.read(self.interface, self.rule)
        keep = DesiredLink(
            link.addresses,
            link.routes,
            self.rule.table,
            self.rule.priority,
            self.rule.fwmark,
            self._mtu(None, fallback=False),
        )
        self._links.apply(diff_links(keep, link), link.index, self.rule)

    def _choose_backend(self, links: LinkManager) -> WireGuardBackend:
        wanted = self.requested_backend
        if wanted == "userspace" or (wanted == "auto" and self.userspace.exists(self.interface)):
            self.userspace.create(self.interface)
            return self.userspace
        kernel = NetlinkBackend()
        if links.index(self.interface) is not None and not self.userspace.exists(self.interface):
            if not _is_wireguard_link(links, self.interface):
                raise DataPlaneError(f"{self.interface} exists and is not a WireGuard interface")
            return kernel
        try:
            kernel.create(self.interface)
            return kernel
        except KernelUnsupported:
            kernel.close()
            if wanted == "kernel":
                raise
        self.userspace.create(self.interface)
        return self.userspace

    def teardown(self) -> None:
        """Remove the rule, routes and interface (stopping wireguard-go)."""
        links = self._links or LinkManager()
        links.remove(self.interface, self.rule)
        backend = self._backend or self._guess_backend(links)
        backend.delete(self.interface)
        links.close()
        self._links, self._backend, self._last = None, None, None

    def _guess_backend(self, links: LinkManager) -> WireGuardBackend:
        if self.userspace.exists(self.interface):
            return self.userspace
        return NetlinkBackend()

    # --- reconcile ---------------------------------------------------------

    def apply(self, netmap: NetMap) -> ApplyResult:
        """Validate ``netmap`` and bring the interface to it, touching only what differs."""
        backend, links = self._require()
        config = build_desired(netmap, self.settings)
        first = next(
            (p.endpoint for _, p in sorted(config.device.peers.items()) if p.endpoint), None
        )
        link = replace(config.link, mtu=self._mtu(first))
        update = diff(config.device, backend.read(self.interface), self._last)
        writes = backend.write(self.interface, update)
        self._last = config.device
        live_link = links.read(self.interface, self.rule)
        writes += links.apply(diff_links(link, live_link), live_link.index, self.rule)
        return ApplyResult(writes=writes, problems=config.problems, peers=len(config.device.peers))

    def status(self) -> tuple[PeerStatus, ...]:
        """The live peers, sorted by public key."""
        backend, _ = self._require()
        live = backend.read(self.interface)
        return tuple(
            PeerStatus(
                public_key=p.public_key,
                endpoint=p.endpoint,
                last_handshake=p.last_handshake,
                rx=p.rx,
                tx=p.tx,
                allowed_ips=tuple(sorted(str(n) for n in p.allowed_ips)),
            )
            for _, p in sorted(live.peers.items())
        )

    def _require(self) -> tuple[WireGuardBackend, LinkManager]:
        if self._backend is None or self._links is None:
            raise DataPlaneError("DataPlane.setup() has not run")
        return self._backend, self._links

    def _mtu(self, endpoint: str | None, *, fallback: bool = True) -> int:
        """The tunnel MTU; 0 (leave alone) if nothing routes and ``fallback`` is off."""
        if self.settings.mtu:
            return self.settings.mtu
        assert self._links is not None
        default = self._links.default_route()
        underlay = underlay_mtu(self._links.ipr, endpoint, default, self.settings.fwmark)
        if underlay is None:
            underlay = (DEFAULT_UNDERLAY_MTU, 6) if fallback else None
        return 0 if underlay is None else tunnel_mtu(*underlay)


def _is_wireguard_link(links: LinkManager, interface: str) -> bool:
    link = links.ipr.link("get", ifname=interface)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "wireguard"


def _check_config(interface: str, fwmark: int, backend: str, private_key: bytes) -> None:
    if not _IFNAME.match(interface) or interface in (".", ".."):
        raise ConfigError(f"bad interface name {interface!r}")
    if not 0 < fwmark < 2**32:
        raise ConfigError("fwmark must be non-zero: the policy rule relies on it")
    if backend not in ("auto", "kernel", "userspace"):
        raise ConfigError(f"unknown backend {backend!r}: auto, kernel or userspace")
    if len(private_key) != 32:
        raise ConfigError("the private key must be 32 bytes")

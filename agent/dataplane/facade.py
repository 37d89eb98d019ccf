"""The data plane facade the agent daemon calls (synchronous; wrap in asyncio.to_thread).

``setup`` picks a backend (kernel if the kernel can create a WireGuard link,
else userspace), creates or adopts the interface and sets key, port, fwmark,
MTU, link up and the policy rule, without touching existing peers (an agent
restart keeps the tunnels). ``apply`` validates a network map and reconciles
the device, the link layer and the inbound packet filter incrementally
(:mod:`agent.dataplane.firewall`: element operations on named sets; a missing
nftables is reported as a problem, the agent keeps running). ``teardown``
removes everything.

An apply costs time proportional to what changed: the map is validated
incrementally (:class:`~agent.dataplane.desired.DesiredBuilder`), and the live
state is read back only when it may differ from what the agent wrote
(:mod:`agent.dataplane.livestate`: first apply, after a failed write, every
``resync_interval`` seconds on the injected ``clock``). The underlay MTU is
re-derived at each read-back and when the endpoint it derives from changes.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from agent.dataplane.backend import WireGuardBackend
from agent.dataplane.desired import DesiredBuilder, DesiredDevice, DesiredLink, LocalSettings
from agent.dataplane.firewall import Firewall, Unavailable
from agent.dataplane.hostplane import HostTraffic, NftRunner
from agent.dataplane.hosttraffic import HostPolicy
from agent.dataplane.livestate import LiveBelief, Snapshot
from agent.dataplane.mtu import DEFAULT_UNDERLAY_MTU, tunnel_mtu, underlay_mtu
from agent.dataplane.netlink import KernelUnsupported, NetlinkBackend
from agent.dataplane.reconcile import changed_peers, diff
from agent.dataplane.routes import LinkLayer, LinkManager, LinkUpdate, RuleSpec, diff_links
from agent.dataplane.uapi import UapiBackend
from wiregate.clock import Clock
from wiregate.errors import ConfigError, DataPlaneError
from wiregate.model import NetMap

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
    """One WireGuard interface with its addresses, routes, rule and MTU.

    ``wireguard`` and ``links`` replace the backend choice and the netlink link
    layer (tests drive the data plane with in-memory fakes).
    """

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
        resync_interval: float = 60.0,
        clock: Clock = time.monotonic,
        wireguard: WireGuardBackend | None = None,
        links: LinkLayer | None = None,
        firewall: Firewall | None = None,
        host_policy: HostPolicy | None = None,
        host_nft: NftRunner | None = None,
        wall: Clock = time.time,
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
        self._injected = wireguard
        self._backend: WireGuardBackend | None = None
        self._links: LinkLayer | None = links
        self._last: DesiredDevice | None = None  # the last config written (endpoint roaming)
        self._builder = DesiredBuilder(self.settings)
        self._belief = LiveBelief(clock=clock, resync_interval=resync_interval)
        self._mtu_for: tuple[str | None, int] | None = None  # (first endpoint, tunnel MTU)
        # in-memory link layers (tests) get no kernel packet filter unless one is injected
        self.firewall = firewall or Firewall(interface, None if links is None else _NO_NFT)
        self._filter_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft")
        # the nodes' own traffic (docs/host-traffic.md): host routes withheld or guarded
        nft = host_nft if host_nft is not None or links is None else _NoNft()
        self.host = HostTraffic(
            host_policy or HostPolicy(), interface=interface, fwmark=fwmark, nft=nft, wall=wall
        )

    # --- lifecycle ---------------------------------------------------------

    def setup(self) -> None:
        """Create or adopt the interface; set key, port, fwmark, MTU, up and the rule."""
        self._links = self._links or LinkManager()
        self._backend = self._injected or self._choose_backend(self._links)
        self.backend_name = self._backend.name
        self._belief.forget()
        read_at = self._belief.now()
        live = self._backend.read(self.interface)
        device = DesiredDevice(
            self.settings.private_key, self.settings.listen_port, self.settings.fwmark, peers={}
        )
        update = replace(diff(device, live, None), peers=())
        self._backend.write(self.interface, update)
        link = self._links.read(self.interface, self.rule)
        keep = DesiredLink(
            link.addresses,
            link.routes,
            self.rule.table,
            self.rule.priority,
            self.rule.fwmark,
            self._mtu(None, fallback=False),
        )
        link_update = diff_links(keep, link)
        self._links.apply(link_update, link.index, self.rule)
        snap = Snapshot(live, link, read_at)
        self._belief.snapshot = replace(
            snap.after(update, link_update, device.public_key), fresh=True
        )
        self.firewall.prepare()

    def _choose_backend(self, links: LinkLayer) -> WireGuardBackend:
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
        self.firewall.teardown()
        self.host.remove_filter()
        links = self._links or LinkManager()
        links.remove(self.interface, self.rule)
        backend = self._backend or self._injected or self._guess_backend()
        backend.delete(self.interface)
        links.close()
        self._links, self._backend, self._last, self._mtu_for = None, None, None, None
        self._belief.forget()

    def _guess_backend(self) -> WireGuardBackend:
        if self.userspace.exists(self.interface):
            return self.userspace
        return NetlinkBackend()

    def set_private_key(self, private_key: bytes) -> None:
        """Use ``private_key`` from the next :meth:`apply` on (a key rotation's switch)."""
        _check_config(self.interface, self.settings.fwmark, self.requested_backend, private_key)
        self.settings = replace(self.settings, private_key=private_key)
        self._builder = DesiredBuilder(self.settings)

    # --- reconcile ---------------------------------------------------------

    def apply(self, netmap: NetMap) -> ApplyResult:
        """Validate ``netmap`` and bring the interface to it, touching only what differs.

        The WireGuard write is started first; the MTU, the link layer, the packet
        filter and the bookkeeping are done while the WireGuard implementation
        works on it. The packet filter is written on a worker thread of its own
        (libnftables releases the GIL while it parses and commits), next to the link
        layer's writes on this one (the filter only admits the sources of
        configured peers, so it may go first).
        """
        backend, _ = self._require()
        config = self._builder.build(netmap)
        snap = self._snapshot()
        last = self._last
        only = None if snap.fresh or last is None else changed_peers(config.device, last)
        update = diff(config.device, snap.device, last, only)
        self.host.saw_peers(snap.device.peers.values())
        wanted = self.host.link(netmap, config)
        self._belief.forget()  # until the writes are known to have gone through
        finish = backend.begin_write(self.interface, update)
        try:
            filtering = self._filter_writer.submit(
                self.firewall.apply, netmap, validated=config.device.peers, repair=snap.fresh
            )
            try:
                link_update, link_writes = self._apply_link(wanted, config.device, snap)
                public = None if update.private_key is None else config.device.public_key
                after = snap.after(update, link_update, public)
            finally:
                filtered = filtering.result()
        finally:
            writes = finish()
            self._last = config.device
        self._belief.snapshot = after
        self.host.write_filter()
        problems = config.problems + filtered + ((self.host.problem,) if self.host.problem else ())
        peers = len(config.device.peers)
        return ApplyResult(writes=writes + link_writes, problems=problems, peers=peers)

    def _snapshot(self) -> Snapshot:
        snap = self._belief.current()
        if snap is None:
            backend, links = self._require()
            read_at = self._belief.now()
            live = backend.read(self.interface)
            snap = Snapshot(live, links.read(self.interface, self.rule), read_at)
            self._mtu_for = None  # the underlay may have changed too
        return snap

    def _apply_link(
        self, wanted: DesiredLink, device: DesiredDevice, snap: Snapshot
    ) -> tuple[LinkUpdate, int]:
        _, links = self._require()
        link = replace(wanted, mtu=self._tunnel_mtu(device))
        update = diff_links(link, snap.link)
        return update, links.apply(update, snap.link.index, self.rule)

    def refresh_host_traffic(self, netmap: NetMap) -> bool:
        """Read WireGuard's handshakes and re-apply ``netmap`` if a host destination
        changes state (a peer's handshake went fresh or stale); True if it did."""
        if not self.host.policy.enabled and not self.host.plan.destinations:
            return False
        backend, _ = self._require()
        live = backend.read(self.interface)
        self.host.saw_peers(live.peers.values())
        if not self.host.replan_needed():
            return False
        self.apply(netmap)
        return True

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

    def _require(self) -> tuple[WireGuardBackend, LinkLayer]:
        if self._backend is None or self._links is None:
            raise DataPlaneError("DataPlane.setup() has not run")
        return self._backend, self._links

    def _tunnel_mtu(self, device: DesiredDevice) -> int:
        """The MTU for ``device``'s first endpoint (by public key), remembered until it changes."""
        keys = [k for k, p in device.peers.items() if p.endpoint]
        first = device.peers[min(keys)].endpoint if keys else None
        if self._mtu_for is None or self._mtu_for[0] != first:
            self._mtu_for = (first, self._mtu(first))
        return self._mtu_for[1]

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


_NO_NFT = Unavailable("no packet filter with an in-memory link layer", "inject a Firewall")


class _NoNft:
    """The host-traffic filter's runner with an in-memory link layer: nothing to write to."""

    def run(self, script: str) -> None:
        raise DataPlaneError("no packet filter with an in-memory link layer")


def _is_wireguard_link(links: LinkLayer, interface: str) -> bool:
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

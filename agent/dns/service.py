"""What the agent daemon calls: names follow the map, the host's resolver follows the server.

:meth:`Names.update` takes each new map: with a ``dns`` field (and ``dns = true`` in
the agent's settings) the server listens on the device's tunnel addresses (and the
``dns_listen`` ones: a node's InternalIP, for its pods' DNS) and answers from the
map's zone, and the host's resolver sends the mesh domain and the split zones to it
(at the tunnel addresses); without one, both stop. :meth:`Names.close` (the agent
stopping, or its device revoked) gives the host's resolver back before the
server goes: a resolver is never left pointing at a server that is not there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.dns.hostconfig import NoResolver, ResolvConf, Resolved, choose_resolver
from agent.dns.server import DnsServer
from agent.dns.zone import build_zone, zone_content
from wiregate.errors import LocalError
from wiregate.logging import get_logger
from wiregate.model import NetMap
from wiregate.settings import AgentSettings

__all__ = ["Names"]

log = get_logger("agent.dns")


class Names:
    """The agent's DNS server and the host resolver's configuration, kept to the map."""

    def __init__(self, settings: AgentSettings, server: DnsServer | None = None) -> None:
        self.settings = settings
        self.server = server or DnsServer(port=settings.dns_port, allow=settings.dns_allow)
        self.resolver: NoResolver | Resolved | ResolvConf | None = None
        self._applied: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._left_out: tuple[str, ...] = ()
        self._content: object = None  # what the served zone was built from
        self.problem = ""

    async def update(self, netmap: NetMap) -> None:
        """Serve ``netmap``'s names (or stop, when it carries none); never raises."""
        config = netmap.self_view.dns
        if not self.settings.dns or config is None:
            await self.close()
            return
        content = (config, zone_content(netmap))
        zone = None
        if content != self._content or self.server.responder is None:  # else: same names
            # its serial: the version the names changed at; big maps are built off the loop
            zone = await asyncio.to_thread(build_zone, netmap, config)
            if zone.left_out != self._left_out and zone.left_out:
                log.warning("device names left out of DNS (no DNS label, or a label shared)",
                            names=list(zone.left_out))  # fmt: skip
            self._left_out, self._content = zone.left_out, content
        addresses = tuple(a.split("/", 1)[0] for a in netmap.self_view.addresses)
        extra = tuple(a for a in self.settings.dns_listen if a not in addresses)
        try:
            await self.server.listen(addresses + extra)
        except LocalError as exc:
            self.problem = exc.message
            log.warning("names not served", error=exc.message)
            return
        if zone is not None:
            self.server.set_zone(zone)
        domains = (config.domain, *(z for z, _ in config.zones))
        await self._configure_host(addresses, domains)

    async def _configure_host(self, addresses: tuple[str, ...], domains: tuple[str, ...]) -> None:
        if self.resolver is None:
            s = self.settings
            self.resolver = choose_resolver(
                s.dns_resolver, interface=s.interface, path=s.dns_resolv_conf,
                backup=s.state_dir / "resolv.conf.original",
            )  # fmt: skip
            if isinstance(self.resolver, NoResolver):
                log.info("host resolver left as is", reason=self.resolver.reason)
        resolver = self.resolver
        try:
            if self._applied != (addresses, domains):
                servers = _servers(resolver, addresses, self.settings.dns_port)
                await asyncio.to_thread(resolver.apply, servers, domains)
                self._applied = (addresses, domains)
                log.info("host resolver configured", kind=resolver.kind, domains=list(domains))
            upstreams = await asyncio.to_thread(resolver.upstreams)
            self.problem = ""
        except LocalError as exc:
            self.problem = exc.message
            log.warning("host resolver not configured", error=exc.message)
            upstreams = []
        self.server.upstreams = tuple(u for u in upstreams if u not in self.server.addresses)

    async def close(self) -> None:
        """Give the host's resolver back, then stop the server."""
        if self.resolver is not None and self._applied is not None:
            try:
                await asyncio.to_thread(self.resolver.restore)
                log.info("host resolver restored", kind=self.resolver.kind)
            except LocalError as exc:
                log.warning("host resolver not restored", error=exc.message)
        self._applied = None
        await self.server.close()
        self.server.responder = None

    def to_dict(self) -> dict[str, Any]:
        """The ``dns`` part of ``wiregate status``."""
        resolver = None if self.resolver is None else self.resolver.kind
        return {**self.server.to_dict(), "host_resolver": resolver, "problem": self.problem}


def _servers(
    resolver: NoResolver | Resolved | ResolvConf, addresses: tuple[str, ...], port: int
) -> list[str]:
    """How ``resolver`` names the server: resolved takes ``ADDR:PORT``, resolv.conf no port."""
    if port == 53:
        return list(addresses)
    if isinstance(resolver, ResolvConf):
        raise LocalError(f"dns_port is {port}: a resolv.conf can only name port 53")
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]

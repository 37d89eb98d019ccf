"""Host traffic from the agent's settings: what it advertises and what it exempts.

* :func:`host_routes`: with ``host_traffic`` on, this node advertises its host
  addresses (``host_addresses``, plus its Node's InternalIPs with
  ``kubernetes = true``) as single-address routes; the gateway approves them
  like any route, so only devices the policy lets carry host ranges (``tag:node``
  in the shipped policy) get them into other nodes' maps.
* :func:`host_policy`: the :class:`HostPolicy` the data plane applies, whose
  exempt networks are ``host_traffic_exempt`` (the API server's addresses) plus
  the gateway's own addresses (:func:`gateway_addresses`), so that neither is ever
  routed into the tunnel (docs/host-traffic.md, "Lock-out analysis").

Everything here is pure except :func:`gateway_addresses` (a resolver call) and
:func:`advertised_host_routes` (the Node read of :mod:`agent.kubenode`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from agent.dataplane.backend import IPNetwork
from agent.dataplane.hosttraffic import HostPolicy
from wiregate.settings import AgentSettings

__all__ = [
    "advertised_host_routes",
    "gateway_addresses",
    "gateway_host",
    "host_policy",
    "host_routes",
]


def host_routes(addresses: Iterable[str]) -> list[str]:
    """Each address as a single-address route (``10.0.0.12/32``, ``2001:db8::1/128``),
    in order, duplicates dropped; loopback, link-local and unspecified ones left out."""
    result: dict[str, None] = {}
    for text in addresses:
        address = ipaddress.ip_interface(text).ip
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            continue
        result[str(ipaddress.ip_network(address))] = None
    return list(result)


async def advertised_host_routes(settings: AgentSettings) -> list[str]:
    """The host routes to enroll with: none unless ``host_traffic`` is on."""
    if settings.host_traffic == "off":
        return []
    addresses = list(settings.host_addresses)
    if settings.kubernetes:
        from agent.kubenode import _source

        addresses.extend((await _source(settings).facts()).internal_ips)
    return host_routes(addresses)


def gateway_host(server: str) -> str | None:
    """The host part of the gateway URL (None if there is none)."""
    return urlsplit(server).hostname


def gateway_addresses(server: str) -> frozenset[IPNetwork]:
    """The gateway's addresses (an IP literal as is, a name resolved); empty when the
    name does not resolve now (the caller keeps what it resolved before)."""
    host = gateway_host(server)
    if not host:
        return frozenset()
    try:
        return frozenset({ipaddress.ip_network(host)})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(ipaddress.ip_network(str(info[4][0]).split("%")[0]) for info in infos)


def host_policy(settings: AgentSettings, gateway: Iterable[IPNetwork] = ()) -> HostPolicy:
    """The data plane's host-traffic policy from ``settings`` and the gateway's addresses."""
    exempt = {ipaddress.ip_network(n) for n in settings.host_traffic_exempt} | set(gateway)
    return HostPolicy(
        mode=settings.host_traffic,
        node_tag=settings.host_traffic_node_tag,
        exempt=frozenset(exempt),
        fresh_seconds=settings.host_traffic_fresh,
    )

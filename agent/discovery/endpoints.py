"""Endpoint candidates of this host: its usable local addresses with the WireGuard port.

NAT traversal (STUN-discovered reflexive addresses) adds to these later; the
pure :func:`candidates` decides which local addresses are worth advertising.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pyroute2 import IPRoute

__all__ = ["candidates", "format_endpoint", "local_addresses", "local_networks"]


def format_endpoint(ip: str, port: int) -> str:
    addr = ipaddress.ip_address(ip)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def candidates(addresses: Iterable[tuple[str, str]], port: int, exclude: set[str]) -> list[str]:
    """``addresses`` are (interface, ip) pairs; keep global unicast ones off ``exclude``."""
    out: list[str] = []
    for ifname, ip in addresses:
        addr = ipaddress.ip_address(ip)
        if ifname in exclude or addr.is_loopback or addr.is_link_local or addr.is_multicast:
            continue
        if addr.is_unspecified:
            continue
        endpoint = format_endpoint(ip, port)
        if endpoint not in out:
            out.append(endpoint)
    return sorted(out, key=lambda e: (e.startswith("["), e))


def local_addresses() -> list[tuple[str, str]]:
    """(interface name, address) for every address in this network namespace."""
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return [
            (str(names.get(a["index"], "")), str(a.get_attr("IFA_ADDRESS")))
            for a in ipr.get_addr()
            if a.get_attr("IFA_ADDRESS")
        ]


def local_networks(skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The networks (CIDRs) of this namespace's addresses, except loopback and ``skip``
    interfaces: where a peer's private address means "on my LAN"."""
    skipped = set(skip)
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found: list[str] = []
        for a in ipr.get_addr():
            address, name = a.get_attr("IFA_ADDRESS"), names.get(a["index"], "")
            if not address or name in skipped or name == "lo":
                continue
            network = ipaddress.ip_interface(f"{address}/{a['prefixlen']}").network
            found.append(str(network))
    return tuple(dict.fromkeys(found))

"""The tunnel MTU: the underlay MTU minus WireGuard's overhead.

Overhead: outer IP header (20 IPv4 / 40 IPv6) + UDP 8 + WireGuard 32 = 60 / 80.
The underlay is the interface holding the default route, or else the route to
the first peer endpoint; an explicit override wins.
"""

from __future__ import annotations

import socket
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from wiregate.net import parse_endpoint

__all__ = ["DEFAULT_UNDERLAY_MTU", "MIN_MTU", "OVERHEAD", "tunnel_mtu", "underlay_mtu"]

OVERHEAD = {4: 60, 6: 80}
MIN_MTU = 1280
DEFAULT_UNDERLAY_MTU = 1500


def tunnel_mtu(underlay: int, version: int, override: int = 0) -> int:
    """The MTU for the tunnel interface (pure); never below 1280 (IPv6's minimum)."""
    if override:
        return override
    return max(MIN_MTU, underlay - OVERHEAD[version])


def underlay_mtu(
    ipr: Any, endpoint: str | None, default: tuple[int, int] | None, fwmark: int = 0
) -> tuple[int, int] | None:
    """(MTU, IP version) of the default route's interface, else of the route to ``endpoint``.

    ``default`` is the (oif, version) of the default route, if any. The route
    lookup carries ``fwmark`` as WireGuard's own packets do. None when nothing
    routes (callers then keep the MTU, or assume 1500 over IPv6).
    """
    if default is not None:
        oif, version = default
        return _link_mtu(ipr, oif), version
    if endpoint:
        address = parse_endpoint(endpoint, allow_names=False, from_peer=False, error=ValueError).ip
        assert address is not None  # allow_names=False: always an address
        found = _route_mtu(ipr, str(address), address.version, fwmark)
        if found is not None:
            return found, address.version
    return None


def _route_mtu(ipr: Any, address: str, version: int, fwmark: int) -> int | None:
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    try:
        route = ipr.route("get", dst=address, family=family, mark=fwmark)[0]
    except NetlinkError:  # ENETUNREACH: no route
        return None
    return _oif_mtu(ipr, route)


def _oif_mtu(ipr: Any, route: Any) -> int:
    metrics = route.get_attr("RTA_METRICS")
    if metrics is not None and metrics.get_attr("RTAX_MTU"):
        return int(metrics.get_attr("RTAX_MTU"))
    return _link_mtu(ipr, route.get_attr("RTA_OIF"))


def _link_mtu(ipr: Any, index: int) -> int:
    return int(ipr.link("get", index=index)[0].get_attr("IFLA_MTU"))

"""Whether this process may configure the network, checked before the agent spends anything.

The agent creates a WireGuard interface and writes addresses, routes and rules:
it needs ``CAP_NET_ADMIN`` in its effective set and a netlink route socket. Both
are checked first, before the state dir, the key or the enrollment: a single-use
enrollment key survives a start that could never have brought the tunnel up.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from wiregate.errors import LocalError

__all__ = [
    "CAP_NET_ADMIN",
    "effective_capabilities",
    "netlink_route_error",
    "require_net_admin",
]

CAP_NET_ADMIN = 12  # bit of CapEff in /proc/self/status
STATUS_PATH = Path("/proc/self/status")

CapReader = Callable[[], int | None]
NetlinkProbe = Callable[[], str | None]


def effective_capabilities(status_path: Path | None = None) -> int | None:
    """The effective capability set (``CapEff``) of this process; None if unreadable."""
    try:
        text = (status_path or STATUS_PATH).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                return None
    return None


def netlink_route_error() -> str | None:
    """None when a netlink route socket opens and binds; the reason otherwise."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.bind((0, 0))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def require_net_admin(
    read_caps: CapReader | None = None, netlink_error: NetlinkProbe | None = None
) -> None:
    """:class:`LocalError` with a hint unless this process holds CAP_NET_ADMIN and can
    open a netlink route socket."""
    caps = (read_caps or effective_capabilities)()
    if caps is None or not caps >> CAP_NET_ADMIN & 1:
        raise LocalError(
            f"the agent needs CAP_NET_ADMIN to manage its WireGuard interface (uid {os.geteuid()}"
            " has not got it); nothing was enrolled",
            hint="run it as root or with CAP_NET_ADMIN (the systemd unit grants it with"
            " AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)",
            code="privileges",
        )
    reason = (netlink_error or netlink_route_error)()
    if reason is not None:
        raise LocalError(
            f"the agent cannot open a netlink route socket: {reason}; nothing was enrolled",
            hint="allow AF_NETLINK (systemd: RestrictAddressFamilies=… AF_NETLINK)",
            code="privileges",
        )

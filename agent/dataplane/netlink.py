"""Kernel WireGuard over generic netlink: writes by :mod:`agent.dataplane.wgnl`, reads
and links by pyroute2.

A write is encoded and sent by the project's own codec (:mod:`agent.dataplane.wgnl`),
as ``wg setconf`` does: the device fields and many peers per ``WG_CMD_SET_DEVICE``
message, each acknowledged before the next, over a plain ``NETLINK_GENERIC``
socket; the returned count is the number of messages sent. pyroute2 encoded each
attribute through its generic machinery and took a round trip through its own
event loop per message: ten times ``wg setconf`` for 1 000 peers.

Reads (``WG_CMD_GET_DEVICE`` dumps) and links still go through pyroute2, whose
synchronous API drives an asyncio loop of its own, bound to the thread that made
the object: called on a thread whose event loop is running it fails ("This event
loop is already running"), and called from another thread its socket answers
ECONNRESET from then on. The agent reads the device from its event loop (status)
and applies from worker threads, so each backend owns one thread on which its
pyroute2 objects are made, used and closed, one call at a time. The write socket
has no such binding (it takes a lock).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from agent.dataplane import wgnl
from agent.dataplane.backend import (
    DeviceUpdate,
    IPNetwork,
    LiveDevice,
    LivePeer,
    PeerUpdate,
    format_endpoint,
    network_from_packed,
    parse_endpoint,
)
from wiregate.errors import BadKey, DataPlaneError
from wiregate.keys import decode_key

__all__ = [
    "KernelUnsupported",
    "NetlinkBackend",
    "wire_device",
    "wire_peer",
]

_NOT_SUPPORTED = (95, 22)  # EOPNOTSUPP, EINVAL: "Unknown device type" (no module)


class KernelUnsupported(DataPlaneError):
    """This kernel cannot create WireGuard interfaces (no module)."""

    code = "no_kernel_wireguard"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, dict) or hasattr(value, "get"):
        return _text(value.get("value"))
    return str(value)


def wire_peer(peer: PeerUpdate) -> wgnl.Peer:
    """The netlink form of one :class:`PeerUpdate` (pure; BadKey or ValueError on a bad
    key or endpoint). A changed peer's allowed IPs replace its old ones."""
    key = decode_key(peer.public_key)
    if peer.remove:
        return wgnl.Peer(key, wgnl.PEER_REMOVE_ME)
    flags = wgnl.PEER_UPDATE_ONLY if peer.update_only else 0
    allowed = None
    if peer.allowed_ips is not None:
        allowed = tuple(peer.allowed_ips)
        if peer.update_only:
            flags |= wgnl.PEER_REPLACE_ALLOWEDIPS
    endpoint = None if peer.endpoint is None else parse_endpoint(peer.endpoint)
    return wgnl.Peer(key, flags, endpoint=endpoint, keepalive=peer.keepalive, allowed_ips=allowed)


def wire_device(name: str, update: DeviceUpdate) -> wgnl.Device:
    """The netlink form of ``update`` for interface ``name`` (pure; ValueError if bad)."""
    return wgnl.Device(
        ifname=name,
        private_key=update.private_key,
        listen_port=update.listen_port,
        fwmark=update.fwmark,
        peers=tuple(wire_peer(p) for p in update.peers),
    )


class NetlinkBackend:
    """The kernel module, driven in the current network namespace."""

    name = "kernel"

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self.ipr = self._call(IPRoute)
        self.wg: Any = None
        self.wgsock = wgnl.WireGuardSocket()
        self._writer: ThreadPoolExecutor | None = None

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on this backend's own thread (see the module docstring)."""
        return self._thread.submit(fn, *args, **kwargs).result()

    def _wireguard(self) -> Any:
        if self.wg is None:
            self.wg = self._call(WireGuard)
        return self.wg

    def close(self) -> None:
        """Release the netlink sockets and the backend's thread."""
        if self.wg is not None:
            self._call(self.wg.close)
        if self._writer is not None:
            self._writer.shutdown()
        self.wgsock.close()
        self._call(self.ipr.close)
        self._thread.shutdown()

    def exists(self, name: str) -> bool:
        return bool(self._call(self.ipr.link_lookup, ifname=name))

    def create(self, name: str) -> None:
        if self.exists(name):
            return
        try:
            self._call(self.ipr.link, "add", ifname=name, kind="wireguard")
        except NetlinkError as exc:
            if exc.code in _NOT_SUPPORTED:
                raise KernelUnsupported("this kernel has no WireGuard module") from None
            raise DataPlaneError(f"creating {name} failed: {exc}") from None

    def delete(self, name: str) -> None:
        found = self._call(self.ipr.link_lookup, ifname=name)
        if found:
            self._call(self.ipr.link, "del", index=found[0])

    def read(self, name: str) -> LiveDevice:
        try:
            messages = list(self._call(self._wireguard().info, name))
        except NetlinkError as exc:
            raise DataPlaneError(f"reading {name} failed: {exc}") from None
        peers: dict[str, LivePeer] = {}
        for msg in messages:
            for raw in msg.get_attr("WGDEVICE_A_PEERS") or ():
                _merge_peer(peers, _live_peer(raw))
        first = messages[0]
        public = first.get_attr("WGDEVICE_A_PUBLIC_KEY")
        return LiveDevice(
            public_key=None if public is None else _text(public),
            listen_port=int(first.get_attr("WGDEVICE_A_LISTEN_PORT") or 0),
            fwmark=int(first.get_attr("WGDEVICE_A_FWMARK") or 0),
            peers=peers,
        )

    def write(self, name: str, update: DeviceUpdate) -> int:
        if update.is_empty:
            return 0
        return self._send(name, self._encode(name, update))

    def begin_write(self, name: str, update: DeviceUpdate) -> Callable[[], int]:
        """Encode now (bad input fails here, nothing sent), send on the writer thread:
        the kernel applies the peers while the caller writes routes and the filter."""
        if update.is_empty:
            return lambda: 0
        messages = self._encode(name, update)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wgnl")
        sent = self._writer.submit(self._send, name, messages)
        return sent.result

    def _encode(self, name: str, update: DeviceUpdate) -> list[bytes]:
        try:
            return self.wgsock.encode(wire_device(name, update))
        except (BadKey, ValueError) as exc:
            raise DataPlaneError(f"WireGuard set on {name} refused: {exc}") from None
        except OSError as exc:
            raise DataPlaneError(f"WireGuard netlink on {name} failed: {exc}") from None

    def _send(self, name: str, messages: list[bytes]) -> int:
        try:
            return self.wgsock.send(messages, name)
        except OSError as exc:
            raise DataPlaneError(f"WireGuard netlink set on {name} failed: {exc}") from None


def _live_peer(raw: Any) -> LivePeer:
    endpoint = raw.get_attr("WGPEER_A_ENDPOINT")
    handshake = raw.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    sec = int(handshake["tv_sec"]) if handshake is not None else 0
    nsec = int(handshake["tv_nsec"]) if handshake is not None else 0
    allowed = raw.get_attr("WGPEER_A_ALLOWEDIPS") or ()
    return LivePeer(
        public_key=_text(raw.get_attr("WGPEER_A_PUBLIC_KEY")),
        allowed_ips=frozenset(_allowed_ip(a["addr"]) for a in allowed),
        endpoint=None if endpoint is None else _endpoint(endpoint),
        keepalive=int(raw.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
        last_handshake=None if sec == 0 and nsec == 0 else sec + nsec / 1e9,
        rx=int(raw.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx=int(raw.get_attr("WGPEER_A_TX_BYTES") or 0),
    )


def _allowed_ip(text: str) -> IPNetwork:
    address, _, length = text.partition("/")
    parsed = ipaddress.ip_address(address)
    return network_from_packed(parsed.packed, int(length) if length else parsed.max_prefixlen)


def _endpoint(raw: Any) -> str | None:
    address = raw.get("addr")
    if not address or raw.get("family", 0) == 0:
        return None
    return format_endpoint(ipaddress.ip_address(address), int(raw["port"]))


def _merge_peer(peers: dict[str, LivePeer], peer: LivePeer) -> None:
    """A peer with many allowed IPs spans several dump messages: merge them."""
    seen = peers.get(peer.public_key)
    if seen is None:
        peers[peer.public_key] = peer
        return
    peers[peer.public_key] = replace(seen, allowed_ips=seen.allowed_ips | peer.allowed_ips)

"""Kernel WireGuard over generic netlink (pyroute2 ``WireGuard``), links via rtnetlink.

pyroute2's ``WireGuard.set`` carries at most one peer per message, and each
message costs a round trip through pyroute2's own event loop (about 12 ms: 1 000
peers took 12 s). A write therefore builds its own ``WG_CMD_SET_DEVICE`` messages
with many peers each, as ``wg setconf`` does: the device fields and peers packed
up to :data:`BATCH_BYTES` per message (:func:`batches`, pure), each message
acknowledged before the next; the returned count is the number of messages sent.

pyroute2's synchronous API drives an asyncio loop of its own, bound to the
thread that made the object: called on a thread whose event loop is running it
fails ("This event loop is already running"), and called from another thread
its socket answers ECONNRESET from then on. The agent reads the device from its
event loop (status) and applies from worker threads, so each backend owns one
thread on which its pyroute2 objects are made, used and closed, one call at a time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, WG_GENL_VERSION, wgmsg

from agent.dataplane.backend import (
    DeviceUpdate,
    IPNetwork,
    LiveDevice,
    LivePeer,
    PeerUpdate,
    format_endpoint,
    network_from_packed,
    network_text,
    parse_endpoint,
)
from wiregate.errors import DataPlaneError
from wiregate.keys import encode_key

__all__ = [
    "BATCH_BYTES",
    "KernelUnsupported",
    "NetlinkBackend",
    "batches",
    "build_set_device",
    "device_attrs",
    "peer_request",
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


def peer_request(peer: PeerUpdate) -> dict[str, Any]:
    """The pyroute2 peer dict for one :class:`PeerUpdate` (pure)."""
    request: dict[str, Any] = {"public_key": peer.public_key}
    if peer.remove:
        request["remove"] = True
        return request
    if peer.update_only:
        request["update_only"] = True
    if peer.endpoint is not None:
        address, port = parse_endpoint(peer.endpoint)
        request["endpoint_addr"] = str(address)
        request["endpoint_port"] = port
    if peer.keepalive is not None:
        request["persistent_keepalive"] = peer.keepalive
    if peer.allowed_ips is not None:
        request["replace_allowed_ips"] = peer.update_only
        request["allowed_ips"] = sorted(network_text(n) for n in peer.allowed_ips)
    return request


BATCH_BYTES = 8192  # peer payload per message before another begins (wg(8) uses pages)


def device_attrs(update: DeviceUpdate) -> list[list[Any]]:
    """The ``WGDEVICE_A_*`` attributes of ``update``'s device fields (pure)."""
    attrs: list[list[Any]] = []
    if update.private_key is not None:
        attrs.append(["WGDEVICE_A_PRIVATE_KEY", encode_key(update.private_key)])
    if update.listen_port is not None:
        attrs.append(["WGDEVICE_A_LISTEN_PORT", update.listen_port])
    if update.fwmark is not None:
        attrs.append(["WGDEVICE_A_FWMARK", update.fwmark])
    return attrs


def batches(requests: list[dict[str, Any]], limit: int = BATCH_BYTES) -> list[list[dict[str, Any]]]:
    """``requests`` in groups whose estimated encoded size stays under ``limit`` (pure);
    always at least one group (the device fields travel in the first)."""
    groups: list[list[dict[str, Any]]] = [[]]
    size = 0
    for request in requests:
        cost = _PEER_BYTES + _ALLOWED_IP_BYTES * len(request.get("allowed_ips", ()))
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = 0
        groups[-1].append(request)
        size += cost
    return groups


_PEER_BYTES = 96  # key, flags, endpoint (IPv6), keepalive, nesting headers
_ALLOWED_IP_BYTES = 36  # family, address (IPv6), mask, nesting headers


async def _set_device(
    core: Any, name: str, attrs: list[list[Any]], peers: list[dict[str, Any]]
) -> None:
    """One ``WG_CMD_SET_DEVICE`` with ``attrs`` and every peer of ``peers``; waits for
    the kernel's acknowledgement (a refusal is raised as pyroute2's NetlinkError)."""
    core.sendto(build_set_device(core, name, attrs, peers).data, (0, 0))
    (answer,) = [x async for x in core.get()]
    error = answer["header"].get("error", None)
    if error is not None:
        raise error


def build_set_device(
    core: Any, name: str, attrs: list[list[Any]], peers: list[dict[str, Any]]
) -> Any:
    """The encoded ``WG_CMD_SET_DEVICE`` message (``core``: pyroute2's AsyncWireGuard,
    for its peer encoder, protocol id and port id)."""
    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", name])
    msg["attrs"].extend(attrs)
    if peers:
        holder = wgmsg()
        for peer in peers:
            core._wg_set_peer(holder, peer)  # validates keys, builds the nested peer
        merged = [entry for _, group in holder["attrs"] for entry in group]
        msg["attrs"].append(["WGDEVICE_A_PEERS", merged])
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["header"]["type"] = core.prid
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["pid"] = core.pid
    msg.encode()
    return msg


class NetlinkBackend:
    """The kernel module, driven in the current network namespace."""

    name = "kernel"

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self.ipr = self._call(IPRoute)
        self.wg: Any = None

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
        wg = self._wireguard()
        device = device_attrs(update)
        groups = batches([peer_request(p) for p in update.peers])

        def send() -> None:
            for index, group in enumerate(groups):
                attrs = device if index == 0 else []
                wg._run_with_cleanup(_set_device, wg.asyncore, name, attrs, group)

        try:
            self._call(send)
        except NetlinkError as exc:
            raise DataPlaneError(f"WireGuard netlink set on {name} failed: {exc.code}") from None
        return len(groups)

    def begin_write(self, name: str, update: DeviceUpdate) -> Callable[[], int]:
        """Netlink writes are synchronous: write now, report the count later."""
        count = self.write(name, update)
        return lambda: count


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

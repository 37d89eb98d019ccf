"""A tiny WireGuard generic-netlink codec: ``WG_CMD_SET_DEVICE`` messages and their sender.

The encoder is pure: :func:`build_set_device` turns a :class:`Device` (the
``WGDEVICE_A_*`` fields and its :class:`Peer` list) into complete netlink
messages, as ``wg setconf`` does: device fields in the first message, peers
packed into messages of at most ``budget`` bytes, every nested attribute marked
``NLA_F_NESTED``. A peer that fits in a message of its own is never split; one
with more allowed IPs than a message holds continues in the next messages (its
public key, ``UPDATE_ONLY`` if it had it, and the rest of its allowed IPs), so
``REPLACE_ALLOWEDIPS`` clears the old set only once. Entries of a nested list
(peers, allowed IPs) have type 0, as wg(8) writes them; pyroute2 numbers them
from 1, and the kernel reads either.

:class:`WireGuardSocket` sends them over a plain ``NETLINK_GENERIC`` socket: the
``wireguard`` family id is resolved once (``CTRL_CMD_GETFAMILY``), then each
message is sent and its acknowledgement read before the next (the kernel
applies a message inside ``sendmsg``); a refusal raises :class:`WireGuardRefused`
with the errno and the kernel's extended-ACK text.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from agent.dataplane.backend import IPNetwork
from agent.dataplane.rtnl import _attrs, _rta  # netlink attributes, as for rtnetlink
from wiregate.errors import DataPlaneError
from wiregate.net import IPAddress

__all__ = [
    "BATCH_BYTES",
    "DEVICE_REPLACE_PEERS",
    "PEER_REMOVE_ME",
    "PEER_REPLACE_ALLOWEDIPS",
    "PEER_UPDATE_ONLY",
    "Device",
    "Peer",
    "WireGuardRefused",
    "WireGuardSocket",
    "build_get_family",
    "build_set_device",
    "parse_acks",
    "parse_family_id",
]

WG_GENL_NAME = b"wireguard"
WG_GENL_VERSION = 1
WG_CMD_SET_DEVICE = 1
DEVICE_REPLACE_PEERS = 0x1
PEER_REMOVE_ME, PEER_REPLACE_ALLOWEDIPS, PEER_UPDATE_ONLY = 0x1, 0x2, 0x4
BATCH_BYTES = 8192  # the size of one message at most (wg(8) uses a page)

_DEV_IFINDEX, _DEV_IFNAME, _DEV_PRIVATE_KEY, _DEV_FLAGS = 1, 2, 3, 5
_DEV_LISTEN_PORT, _DEV_FWMARK, _DEV_PEERS = 6, 7, 8
_PEER_PUBLIC_KEY, _PEER_PRESHARED_KEY, _PEER_FLAGS, _PEER_ENDPOINT = 1, 2, 3, 4
_PEER_KEEPALIVE, _PEER_ALLOWEDIPS = 5, 9
_AIP_FAMILY, _AIP_IPADDR, _AIP_CIDR = 1, 2, 3
_NLA_F_NESTED = 0x8000
_GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, _CTRL_ATTR_FAMILY_ID, _CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_F_REQUEST, _F_ACK, _F_CAPPED, _F_ACK_TLVS = 0x1, 0x4, 0x100, 0x200
_NLMSGERR_ATTR_MSG = 1
_SOL_NETLINK, _NETLINK_CAP_ACK, _NETLINK_EXT_ACK = 270, 10, 11
_NETLINK_GENERIC = 16
_KEY_LEN = 32

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_GENL = struct.Struct("=BBH")  # genlmsghdr
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_KEY_ATTR = struct.Struct("=HH32s")
_U32_ATTR = struct.Struct("=HHI")
_U16_ATTR = struct.Struct("=HHHxx")
_ENDPOINT4 = struct.Struct("=HHH2s4s8x")
_ENDPOINT6 = struct.Struct("=HHH2s4x16s4x")  # flowinfo and scope id zero
# an allowed IP's list entry: nest header, family (u16, padded), address, mask (u8, padded)
_ALLOWED4 = struct.Struct("=HHHHH2xHH4sHHB3x")
_ALLOWED6 = struct.Struct("=HHHHH2xHH16sHHB3x")
_AIP4_HEAD = (_ALLOWED4.size, _NLA_F_NESTED, 6, _AIP_FAMILY, socket.AF_INET, 8, _AIP_IPADDR)
_AIP6_HEAD = (_ALLOWED6.size, _NLA_F_NESTED, 6, _AIP_FAMILY, socket.AF_INET6, 20, _AIP_IPADDR)
_AIP_CIDR_HEAD = (5, _AIP_CIDR)
_PREFIX = _HDR.size + _GENL.size


class WireGuardRefused(DataPlaneError):
    """The kernel refused a WireGuard netlink request (``errno`` says why)."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Peer:
    """One ``WGDEVICE_A_PEERS`` entry: raw 32-byte keys, ``PEER_*`` flags.

    ``allowed_ips`` ``None`` sends no list; an empty tuple sends an empty one.
    """

    public_key: bytes
    flags: int = 0
    preshared_key: bytes | None = None
    endpoint: tuple[IPAddress, int] | None = None
    keepalive: int | None = None
    allowed_ips: tuple[IPNetwork, ...] | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """A ``WG_CMD_SET_DEVICE`` request: the interface (by name or index) and its changes."""

    ifname: str | None = None
    ifindex: int | None = None
    private_key: bytes | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    flags: int = 0
    peers: tuple[Peer, ...] = ()


# --- encoding -------------------------------------------------------------------


def _key(kind: int, key: bytes) -> bytes:
    if len(key) != _KEY_LEN:
        raise ValueError("a WireGuard key must be 32 bytes")
    return _KEY_ATTR.pack(36, kind, key)


def _endpoint(address: IPAddress, port: int) -> bytes:
    port_be = port.to_bytes(2, "big")
    if address.version == 4:
        return _ENDPOINT4.pack(20, _PEER_ENDPOINT, socket.AF_INET, port_be, address.packed)
    return _ENDPOINT6.pack(32, _PEER_ENDPOINT, socket.AF_INET6, port_be, address.packed)


def _allowed_ip(net: IPNetwork) -> bytes:
    """One allowed IP as a list entry: its nest header, family, address and mask."""
    if net.version == 4:
        return _ALLOWED4.pack(
            *_AIP4_HEAD, net.network_address.packed, *_AIP_CIDR_HEAD, net.prefixlen
        )
    return _ALLOWED6.pack(*_AIP6_HEAD, net.network_address.packed, *_AIP_CIDR_HEAD, net.prefixlen)


def _peer_head(peer: Peer) -> bytes:
    """The peer's attributes before its allowed IPs."""
    head = _key(_PEER_PUBLIC_KEY, peer.public_key)
    if peer.flags & PEER_REMOVE_ME:
        return head + _U32_ATTR.pack(8, _PEER_FLAGS, peer.flags)
    if peer.endpoint is not None:
        head += _endpoint(*peer.endpoint)
    if peer.preshared_key is not None:
        head += _key(_PEER_PRESHARED_KEY, peer.preshared_key)
    if peer.keepalive is not None:
        head += _U16_ATTR.pack(6, _PEER_KEEPALIVE, peer.keepalive)
    return head + _U32_ATTR.pack(8, _PEER_FLAGS, peer.flags)


def _entry(payload: bytes) -> bytes:
    """A nested-list entry (type 0, as wg(8) writes them; the kernel reads any type)."""
    return _NLA.pack(4 + len(payload), _NLA_F_NESTED) + payload


def _peer_entry(head: bytes, ips: bytes | None) -> bytes:
    if ips is None:
        return _entry(head)
    return _entry(head + _NLA.pack(4 + len(ips), _NLA_F_NESTED | _PEER_ALLOWEDIPS) + ips)


def _device_fields(device: Device) -> bytes:
    out = b""
    if device.private_key is not None:
        out += _key(_DEV_PRIVATE_KEY, device.private_key)
    if device.listen_port is not None:
        out += _U16_ATTR.pack(6, _DEV_LISTEN_PORT, device.listen_port)
    if device.fwmark is not None:
        out += _U32_ATTR.pack(8, _DEV_FWMARK, device.fwmark)
    if device.flags:
        out += _U32_ATTR.pack(8, _DEV_FLAGS, device.flags)
    return out


def _interface(device: Device) -> bytes:
    if device.ifindex is not None:
        return _U32_ATTR.pack(8, _DEV_IFINDEX, device.ifindex)
    if not device.ifname:
        raise ValueError("a WireGuard device needs an interface name or index")
    return _rta(_DEV_IFNAME, device.ifname.encode("ascii") + b"\0")


class _Packer:
    """Peer entries gathered into message bodies of at most ``budget`` bytes (every
    attribute built here is 4-byte aligned, so sizes add up exactly)."""

    def __init__(self, interface: bytes, first: bytes, budget: int) -> None:
        self.interface, self.budget = interface, budget
        self.bodies: list[tuple[bytes, list[bytes]]] = [(interface + first, [])]
        self.room = budget - _PREFIX - len(interface + first) - 4  # 4: the peers' nest

    def flush(self) -> None:
        self.bodies.append((self.interface, []))
        self.room = self.budget - _PREFIX - len(self.interface) - 4

    def add(self, entry: bytes) -> None:
        self.bodies[-1][1].append(entry)
        self.room -= len(entry)

    def peer(self, peer: Peer) -> None:
        head = _peer_head(peer)
        nets = peer.allowed_ips
        if nets is None:
            entry = _entry(head)
        else:
            ips = [_allowed_ip(n) for n in nets]
            entry = _peer_entry(head, b"".join(ips))
        if len(entry) > self.room and self.bodies[-1][1]:
            self.flush()
        if len(entry) <= self.room or nets is None:
            self.add(entry)
        else:
            self._split(peer, head, ips)

    def _split(self, peer: Peer, head: bytes, ips: list[bytes]) -> None:
        """A peer larger than a message: its allowed IPs continue in the next ones."""
        rest = ips
        while True:
            room, taken = self.room - 4 - len(head) - 4, 0
            while taken < len(rest) and len(rest[taken]) <= room:
                room -= len(rest[taken])
                taken += 1
            if taken == 0 and not self.bodies[-1][1]:
                raise ValueError(f"a message budget of {self.budget} bytes holds no allowed IP")
            if taken:
                self.add(_peer_entry(head, b"".join(rest[:taken])))
                rest = rest[taken:]
            if not rest:
                return
            self.flush()
            flags = peer.flags & PEER_UPDATE_ONLY
            head = _key(_PEER_PUBLIC_KEY, peer.public_key) + _U32_ATTR.pack(8, _PEER_FLAGS, flags)


def build_set_device(
    family: int, device: Device, *, seq: int = 1, pid: int = 0, budget: int = BATCH_BYTES
) -> list[bytes]:
    """The ``WG_CMD_SET_DEVICE`` messages for ``device`` (pure), numbered from ``seq``.

    Always at least one message (the device fields travel in the first); each
    asks for an acknowledgement. ValueError on a key that is not 32 bytes, a
    missing interface, or a ``budget`` too small for one allowed IP.
    """
    packer = _Packer(_interface(device), _device_fields(device), budget)
    for peer in device.peers:
        packer.peer(peer)
    out = []
    for number, (fields, peers) in enumerate(packer.bodies, seq):
        if peers:
            joined = b"".join(peers)
            fields += _NLA.pack(4 + len(joined), _NLA_F_NESTED | _DEV_PEERS) + joined
        out.append(_message(family, WG_CMD_SET_DEVICE, WG_GENL_VERSION, fields, number, pid))
    return out


def _message(family: int, cmd: int, version: int, body: bytes, seq: int, pid: int) -> bytes:
    size = _PREFIX + len(body)
    head = _HDR.pack(size, family, _F_REQUEST | _F_ACK, seq, pid)
    return head + _GENL.pack(cmd, version, 0) + body


def build_get_family(name: bytes = WG_GENL_NAME, *, seq: int = 1) -> bytes:
    """``CTRL_CMD_GETFAMILY`` for the generic-netlink family ``name`` (pure)."""
    body = _rta(_CTRL_ATTR_FAMILY_NAME, name + b"\0")
    return _message(_GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, 1, body, seq, 0)


# --- decoding answers -----------------------------------------------------------


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) for each netlink message in ``data``."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size or offset + length > len(data):
            raise DataPlaneError("malformed netlink message")
        yield kind, flags, seq, data[offset + _HDR.size : offset + length]
        offset += (length + 3) & ~3


def _ack(flags: int, payload: bytes) -> tuple[int, str]:
    """(errno, kernel message) of an NLMSG_ERROR payload (errno 0: acknowledged)."""
    code = -struct.unpack_from("=i", payload)[0]
    if not code or not flags & _F_ACK_TLVS or len(payload) < 4 + _HDR.size:
        return code, ""
    echoed = _HDR.size if flags & _F_CAPPED else _HDR.unpack_from(payload, 4)[0]
    text = _attrs(payload[4 + ((echoed + 3) & ~3) :]).get(_NLMSGERR_ATTR_MSG, b"")
    return code, text.rstrip(b"\0").decode("utf-8", "replace")


def parse_acks(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(seq, errno, kernel message) for each acknowledgement in ``data`` (errno 0: done)."""
    for kind, flags, seq, payload in _messages(data):
        if kind == _NLMSG_ERROR and len(payload) >= 4:
            yield (seq, *_ack(flags, payload))


def parse_family_id(data: bytes, name: bytes = WG_GENL_NAME) -> int:
    """The family id in a ``CTRL_CMD_NEWFAMILY`` answer; WireGuardRefused if refused."""
    for kind, flags, _seq, payload in _messages(data):
        if kind == _NLMSG_ERROR and len(payload) >= 4:
            code, text = _ack(flags, payload)
            if code:
                what = f"looking up the generic-netlink family {name.decode()}"
                raise WireGuardRefused(_describe(what, code, text), code)
        elif kind == _GENL_ID_CTRL:
            found = _attrs(payload[_GENL.size :]).get(_CTRL_ATTR_FAMILY_ID)
            if found is not None and len(found) >= 2:
                return int(_U16.unpack_from(found)[0])
    raise DataPlaneError("no family id in the generic-netlink controller's answer")


def _describe(what: str, code: int, text: str) -> str:
    name = errno.errorcode.get(code, str(code))
    detail = f": {text}" if text else ""
    return f"{what} refused: {name} ({os.strerror(code)}){detail}"


# --- the socket -----------------------------------------------------------------


class WireGuardSocket:
    """A ``NETLINK_GENERIC`` socket that applies ``WG_CMD_SET_DEVICE`` requests.

    Thread-safe: one request at a time is sent, and :meth:`encode` may run on
    another thread than :meth:`send`. The family id is resolved on first use.
    """

    def __init__(self, budget: int = BATCH_BYTES, family: bytes = WG_GENL_NAME) -> None:
        self.budget, self.family_name = budget, family
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._family = 0
        self._seq = 0

    def close(self) -> None:
        """Release the socket."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def set_device(self, device: Device) -> int:
        """Apply ``device``; return the number of messages sent (see :meth:`send`)."""
        return self.send(self.encode(device), device.ifname or f"ifindex {device.ifindex}")

    def encode(self, device: Device) -> list[bytes]:
        """The messages that apply ``device``, numbered for this socket; ValueError on
        bad input, WireGuardRefused if the kernel has no WireGuard family."""
        with self._lock:
            family = self._open_locked()[1]
            messages = build_set_device(family, device, seq=self._seq + 1, budget=self.budget)
            self._seq += len(messages)
            return messages

    def send(self, messages: list[bytes], where: str) -> int:
        """Send ``messages`` (from :meth:`encode`), each acknowledged before the next;
        return how many. WireGuardRefused at the first one the kernel refuses (those
        before it are applied, those after it are not sent)."""
        with self._lock:
            sock = self._open_locked()[0]
            for message in messages:
                sock.send(message)
                code, text = self._ack(sock, _HDR.unpack_from(message)[3])
                if code:
                    what = f"WireGuard set on {where}"
                    raise WireGuardRefused(_describe(what, code, text), code)
            return len(messages)

    def _open_locked(self) -> tuple[socket.socket, int]:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
            try:
                sock.bind((0, 0))
                sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
                sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
                self._seq += 1
                sock.send(build_get_family(self.family_name, seq=self._seq))
                self._family = parse_family_id(sock.recv(1 << 16), self.family_name)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock, self._family

    @staticmethod
    def _ack(sock: socket.socket, seq: int) -> tuple[int, str]:
        while True:
            for got, code, text in parse_acks(sock.recv(1 << 16)):
                if got == seq:
                    return code, text

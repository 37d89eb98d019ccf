"""A tiny rtnetlink codec for routes: dumps and batched writes.

With a thousand peers pyroute2 spends ~0.6 ms building each route message, so
routes are dumped and written here instead: hundreds of routes per ``sendmsg``,
only the last message of a batch asks for an ACK (the kernel processes a batch
synchronously inside ``sendmsg`` and reports every failure anyway), so a batch
costs one ``recv`` unless something failed.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Iterator

from agent.dataplane.backend import IPNetwork, network_from_packed
from wiregate.errors import DataPlaneError

__all__ = [
    "DELROUTE",
    "NEWROUTE",
    "RT_TABLE_MAIN",
    "RouteSocket",
    "build_route",
    "parse_route",
]

_NLMSG_ERROR, _NLMSG_DONE = 2, 3
NEWROUTE, DELROUTE, _GETROUTE = 24, 25, 26
_F_REQUEST, _F_ACK, _F_DUMP, _F_EXCL, _F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
_RTA_DST, _RTA_OIF, _RTA_TABLE = 1, 4, 15
_RT_TABLE_COMPAT, RT_TABLE_MAIN = 252, 254
_RTPROT_STATIC, _RTN_UNICAST = 4, 1
_SCOPE_LINK, _SCOPE_UNIVERSE, _SCOPE_NOWHERE = 253, 0, 255
_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_BATCH = 1024
_SOL_NETLINK, _NETLINK_GET_STRICT_CHK = 270, 12
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_EEXIST, _ESRCH = 17, 3


def _rta(kind: int, payload: bytes) -> bytes:
    data = _RTA.pack(4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _route_attrs(oif: int, table: int) -> bytes:
    return _rta(_RTA_TABLE, _U32.pack(table)) + _rta(_RTA_OIF, _U32.pack(oif))


def build_route(
    op: int, net: IPNetwork, oif: int, table: int, seq: int, *, ack: bool = True
) -> bytes:
    """One RTM_NEWROUTE / RTM_DELROUTE message for ``net`` via ``oif`` in ``table``."""
    return _route_message(op, net, _route_attrs(oif, table), seq, ack)


def _route_message(op: int, net: IPNetwork, attrs: bytes, seq: int, ack: bool) -> bytes:
    if op == NEWROUTE:
        flags = _F_REQUEST | _F_CREATE | _F_EXCL
        scope = _SCOPE_LINK if net.version == 4 else _SCOPE_UNIVERSE
    else:
        flags, scope = _F_REQUEST, _SCOPE_NOWHERE
    plen = net.prefixlen
    rtm = _RTMSG.pack(
        _FAMILY[net.version], plen, 0, 0, _RT_TABLE_COMPAT, _RTPROT_STATIC, scope, _RTN_UNICAST, 0
    )
    if plen:
        attrs += _rta(_RTA_DST, net.network_address.packed)
    size = _HDR.size + len(rtm) + len(attrs)
    return _HDR.pack(size, op, flags | (_F_ACK if ack else 0), seq, 0) + rtm + attrs


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) for each netlink message in ``data``."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            raise DataPlaneError("malformed netlink message")
        yield kind, seq, data[offset + _HDR.size : offset + length]
        offset += (length + 3) & ~3


def _attrs(data: bytes) -> dict[int, bytes]:
    result: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4:
            break
        result[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return result


def parse_route(payload: bytes) -> tuple[IPNetwork, int, int]:
    """(destination, table, oif) of an RTM_NEWROUTE payload."""
    family, dst_len = payload[0], payload[1]
    attrs = _attrs(payload[_RTMSG.size :])
    table = _U32.unpack(attrs[_RTA_TABLE])[0] if _RTA_TABLE in attrs else payload[4]
    oif = _U32.unpack(attrs[_RTA_OIF])[0] if _RTA_OIF in attrs else 0
    dst = attrs.get(_RTA_DST) or b"\0" * (4 if family == socket.AF_INET else 16)
    return network_from_packed(dst, dst_len), table, oif


def _error_code(payload: bytes) -> int:
    return -int(struct.unpack_from("=i", payload)[0])


def _strerror(code: int) -> str:
    return f"errno {code} ({os.strerror(code)})"


class RouteSocket:
    """A raw NETLINK_ROUTE socket for route dumps and batched route writes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
        self.seq = 0

    def close(self) -> None:
        """Release the socket."""
        self.sock.close()

    def dump(self, table: int, oif: int | None) -> list[tuple[IPNetwork, int]]:
        """(destination, oif) of the routes in ``table`` (through ``oif`` if given)."""
        routes: list[tuple[IPNetwork, int]] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            self.seq += 1
            attrs = _rta(_RTA_TABLE, _U32.pack(table))
            if oif is not None:
                attrs += _rta(_RTA_OIF, _U32.pack(oif))
            body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) + attrs
            hdr = _HDR.pack(_HDR.size + len(body), _GETROUTE, _F_REQUEST | _F_DUMP, self.seq, 0)
            self.sock.send(hdr + body)
            for net, rt_table, rt_oif in self._read_dump():
                if rt_table == table and oif in (None, rt_oif):
                    routes.append((net, rt_oif))
        return routes

    def _read_dump(self) -> Iterator[tuple[IPNetwork, int, int]]:
        while True:
            data = self.sock.recv(1 << 20)
            for kind, _seq, payload in _messages(data):
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR and _error_code(payload):
                    raise DataPlaneError(f"route dump failed: {_strerror(_error_code(payload))}")
                if kind == NEWROUTE:
                    yield parse_route(payload)

    def write(self, op: int, nets: Iterable[IPNetwork], oif: int, table: int) -> int:
        """Add or delete ``nets``; return the number of routes written (one message each)."""
        ordered = sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
        for start in range(0, len(ordered), _BATCH):
            chunk = ordered[start : start + _BATCH]
            first, last = self.seq + 1, self.seq + len(chunk)
            self.seq = last
            data = b"".join(
                build_route(op, net, oif, table, first + i, ack=first + i == last)
                for i, net in enumerate(chunk)
            )
            self.sock.send(data)
            self._read_until(last, _EEXIST if op == NEWROUTE else _ESRCH)
        return len(ordered)

    def _read_until(self, last: int, tolerated: int) -> None:
        """Read failures (EEXIST / ESRCH: already as wanted) until ``last`` is acknowledged."""
        failure = 0
        while True:
            for kind, seq, payload in _messages(self.sock.recv(1 << 20)):
                if kind != _NLMSG_ERROR:
                    continue
                code = _error_code(payload)
                if code not in (0, tolerated):
                    failure = failure or code
                if seq != last:
                    continue
                if failure:
                    raise DataPlaneError(f"route update refused: {_strerror(failure)}")
                return

"""ICMP echo for ``wiregate ping``: the codec (pure) and one async echo over a socket.

The socket is the kernel's ping socket (``SOCK_DGRAM``) where
``net.ipv4.ping_group_range`` allows it, else a raw socket (root or CAP_NET_RAW).
A raw IPv4 socket receives the IP header too; the kernel fills the ICMPv6
checksum itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

from wiregate.errors import LocalError

__all__ = ["EchoSocket", "build_echo", "checksum", "parse_reply"]

ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
_HEADER = struct.Struct("!BBHHH")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_echo(version: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An echo request (the ICMPv6 checksum is left to the kernel)."""
    head = _HEADER.pack(ECHO_REQUEST[version], 0, 0, ident & 0xFFFF, seq & 0xFFFF)
    if version == 6:
        return head + payload
    csum = checksum(head + payload)
    return _HEADER.pack(ECHO_REQUEST[4], 0, csum, ident & 0xFFFF, seq & 0xFFFF) + payload


def parse_reply(version: int, data: bytes, *, ip_header: bool) -> tuple[int, int] | None:
    """``(ident, seq)`` of an echo reply; None for anything else (other ICMP, short)."""
    if ip_header and version == 4:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < _HEADER.size:
        return None
    kind, code, _, ident, seq = _HEADER.unpack_from(data)
    if kind != ECHO_REPLY[version] or code != 0:
        return None
    return ident, seq


@dataclass(slots=True)
class EchoSocket:
    """One ICMP socket toward tunnel addresses of one family."""

    sock: socket.socket
    version: int
    raw: bool
    ident: int

    @classmethod
    def open(cls, address: str, ident: int) -> EchoSocket:
        version = ipaddress.ip_address(address).version
        family, proto = (
            (socket.AF_INET, socket.IPPROTO_ICMP)
            if version == 4
            else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
        )
        for kind, raw in ((socket.SOCK_DGRAM, False), (socket.SOCK_RAW, True)):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue
            sock.setblocking(False)
            return cls(sock, version, raw, ident)
        raise LocalError("cannot open an ICMP socket", hint="run as root (or with CAP_NET_RAW)")

    async def echo(self, address: str, seq: int, wait: float) -> float | None:
        """Send one echo request; the round trip in seconds, or None without a reply."""
        loop = asyncio.get_running_loop()
        payload = b"wiregate-ping" + seq.to_bytes(4, "big")
        start = time.monotonic()
        await loop.sock_sendto(self.sock, build_echo(self.version, self.ident, seq, payload),
                               (address, 0))  # fmt: skip
        deadline = start + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                data, source = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 4096), left)
            except TimeoutError:
                return None
            reply = parse_reply(self.version, data, ip_header=self.raw)
            # a ping socket rewrites the identifier; a raw one sees every reply
            if reply is None or reply[1] != seq & 0xFFFF or not _same(source[0], address):
                continue
            if self.raw and reply[0] != self.ident & 0xFFFF:
                continue
            return time.monotonic() - start
        return None

    def close(self) -> None:
        self.sock.close()


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b)

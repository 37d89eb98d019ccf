"""STUN from the WireGuard port while WireGuard owns it: UDP through a raw socket.

WireGuard (the kernel module or wireguard-go) holds the listen port, so an
ordinary UDP socket cannot send from it. A raw socket
``socket(AF_INET, SOCK_RAW, IPPROTO_UDP)`` (CAP_NET_RAW) can: we write the UDP
header ourselves with that source port (checksum 0, legal on IPv4) and the
kernel adds the IP header. The NAT sees the same 5-tuple as WireGuard's own
traffic to that server, so the reflexive address learnt is the mapping
WireGuard uses. Raw UDP sockets also receive a copy of every incoming UDP
datagram (with its IP header); replies are picked out by destination port,
source address and STUN transaction id.

Sans-IO: :func:`build_udp_header`, :func:`parse_ipv4_udp`, :func:`is_reply` and
:func:`reply_filter`, a classic BPF program the kernel runs so that only the
awaited server's datagrams to our port reach the socket (a busy WireGuard port
would otherwise flood it, and the answer could be dropped with the rest). The
adapter: :class:`RawUdpSocket` and :func:`raw_stun_query`.

IPv4 only: an IPv6 raw socket does not hand back the IP header and IPv6 needs a
real UDP checksum (over the source address the kernel picks), which this module
does not do yet.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from relay.client.stun import BindingResponse, build_binding_request, parse_binding_response
from relay.errors import StunError, StunErrorResponse, StunTimeout
from relay.stun import BINDING, MessageClass, build_message
from wiregate.clock import Clock

__all__ = [
    "RawAnswer",
    "RawUdpSocket",
    "UdpDatagram",
    "build_udp_header",
    "is_reply",
    "parse_ipv4_udp",
    "raw_request",
    "raw_stun_query",
    "reply_filter",
    "send_burst",
]

Addr = tuple[str, int]
_T = TypeVar("_T")
_UDP = struct.Struct("!HHHH")
_IP_PROTO_UDP = 17
_BPF = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_SO_ATTACH_FILTER = 26


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One UDP datagram as the raw socket saw it: addresses and payload."""

    src: Addr
    dst: Addr
    payload: bytes


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """A STUN answer received on the raw socket, and how long it took."""

    response: BindingResponse
    rtt: float


def build_udp_header(src_port: int, dst_port: int, payload: bytes) -> bytes:
    """UDP header + ``payload`` with checksum 0 ("none", allowed on IPv4)."""
    for port in (src_port, dst_port):
        if not 0 < port < 65536:
            raise ValueError(f"UDP port {port} out of range")
    length = _UDP.size + len(payload)
    if length > 65535:
        raise ValueError("UDP payload too large")
    return _UDP.pack(src_port, dst_port, length, 0) + payload


def parse_ipv4_udp(packet: bytes) -> UdpDatagram | None:
    """An IPv4 packet (IP header first, as a raw socket reads it) to its UDP datagram.

    None for anything that is not an unfragmented, well-formed IPv4 UDP packet.
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total, frag, proto = struct.unpack_from("!H2xHxB", packet, 2)
    if ihl < 20 or proto != _IP_PROTO_UDP or frag & 0x3FFF or total > len(packet):
        return None
    if total < ihl + _UDP.size:
        return None
    sport, dport, length, _ = _UDP.unpack_from(packet, ihl)
    if length < _UDP.size or ihl + length > total:
        return None
    src = str(ipaddress.IPv4Address(packet[12:16]))
    dst = str(ipaddress.IPv4Address(packet[16:20]))
    return UdpDatagram((src, sport), (dst, dport), packet[ihl + _UDP.size : ihl + length])


def is_reply(datagram: UdpDatagram, server: Addr, local_port: int) -> bool:
    """Whether ``datagram`` comes from ``server`` to our ``local_port``."""
    return datagram.src == server and datagram.dst[1] == local_port


def reply_filter(server: Addr, local_port: int) -> bytes:
    """Classic BPF (offsets from the IP header): keep UDP from ``server`` to ``local_port``."""
    ip = int(ipaddress.IPv4Address(server[0]))
    program = [
        (0x20, 0, 0, 12),  # ld [12]: source address
        (0x15, 0, 6, ip),  # jeq server ip, else drop
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): IP header length
        (0x48, 0, 0, 0),  # ldh [x+0]: UDP source port
        (0x15, 0, 3, server[1]),  # jeq server port, else drop
        (0x48, 0, 0, 2),  # ldh [x+2]: UDP destination port
        (0x15, 0, 1, local_port),  # jeq local port, else drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret: keep the whole packet
        (0x06, 0, 0, 0),  # ret 0: drop
    ]
    return b"".join(_BPF.pack(*insn) for insn in program)


class RawUdpSocket:
    """A non-blocking IPv4 raw UDP socket; use as a context manager."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self._sock.setblocking(False)

    def __enter__(self) -> RawUdpSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def keep_only(self, server: Addr, local_port: int) -> None:
        """Have the kernel drop every datagram but ``server``'s to ``local_port``."""
        code = reply_filter(server, local_port)
        buffer = ctypes.create_string_buffer(code, len(code))
        prog = struct.pack("HL", len(code) // _BPF.size, ctypes.addressof(buffer))
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)

    async def send(self, src_port: int, dst: Addr, payload: bytes) -> None:
        """Send ``payload`` from UDP port ``src_port`` to ``dst`` (the kernel picks the IP)."""
        datagram = build_udp_header(src_port, dst[1], payload)
        await asyncio.get_running_loop().sock_sendto(self._sock, datagram, (dst[0], 0))

    async def receive(self) -> UdpDatagram:
        """The next incoming UDP datagram this host sees (any port)."""
        loop = asyncio.get_running_loop()
        while True:
            packet = await loop.sock_recv(self._sock, 65535)
            datagram = parse_ipv4_udp(packet)
            if datagram is not None:
                return datagram


async def raw_stun_query(
    server: Addr,
    local_port: int,
    wait: float = 1.0,
    clock: Clock = time.monotonic,
) -> RawAnswer:
    """A STUN Binding request from ``local_port`` via a raw socket, retransmitted until
    ``wait`` passes. ``server`` is an IPv4 literal. Raises
    :class:`~relay.errors.StunTimeout` or :class:`~relay.errors.StunErrorResponse`;
    ``OSError`` (``PermissionError`` without CAP_NET_RAW) comes through as is.

    The RTT is measured from the last (re)transmission to the answer."""
    transaction_id, request = build_binding_request()

    def parse(payload: bytes) -> BindingResponse | None:
        try:
            return parse_binding_response(payload, transaction_id)
        except StunErrorResponse:
            raise
        except StunError:
            return None  # not ours, or malformed: keep listening

    try:
        response, rtt = await raw_request(server, local_port, request, parse, wait, clock)
    except TimeoutError:
        raise StunTimeout(f"no STUN answer from {server[0]}:{server[1]} within {wait}s") from None
    return RawAnswer(response, rtt)


async def raw_request(
    server: Addr,
    local_port: int,
    request: bytes,
    parse: Callable[[bytes], _T | None],
    wait: float = 1.0,
    clock: Clock = time.monotonic,
) -> tuple[_T, float]:
    """Send ``request`` from ``local_port`` to ``server`` through a raw socket,
    retransmitting with a doubling timeout, until ``parse`` accepts an answer's payload
    (None: not the answer, keep listening; an exception from ``parse`` ends the
    exchange). Returns the parsed answer and the RTT from the last transmission;
    raises ``TimeoutError`` after ``wait`` seconds."""
    with RawUdpSocket() as sock:
        sock.keep_only(server, local_port)
        listener = asyncio.create_task(_await_answer(sock, server, local_port, parse))
        try:
            return await _retransmit(sock, server, local_port, request, listener, wait, clock)
        finally:
            listener.cancel()


async def _await_answer(
    sock: RawUdpSocket, server: Addr, local_port: int, parse: Callable[[bytes], _T | None]
) -> _T:
    while True:
        datagram = await sock.receive()
        if is_reply(datagram, server, local_port):
            answer = parse(datagram.payload)
            if answer is not None:
                return answer


async def _retransmit(
    sock: RawUdpSocket,
    server: Addr,
    local_port: int,
    request: bytes,
    listener: asyncio.Task[_T],
    wait: float,
    clock: Clock,
) -> tuple[_T, float]:
    rto = wait / 4
    async with asyncio.timeout(wait):
        while True:
            sent = clock()
            await sock.send(local_port, server, request)
            done, _ = await asyncio.wait({listener}, timeout=rto)
            if done:
                return listener.result(), clock() - sent
            rto *= 2


async def send_burst(
    address: str,
    ports: Sequence[int],
    local_port: int,
    interval: float,
    payload: bytes | None = None,
) -> int:
    """Send ``payload`` (default: a bare 20-byte STUN Binding request, no attribute)
    from ``local_port`` to each of ``ports`` at ``address``, ``interval`` seconds apart,
    through one raw socket. Returns how many were sent; ``OSError`` (no CAP_NET_RAW)
    comes through."""
    if payload is None:
        payload = build_message(BINDING, MessageClass.REQUEST, secrets.token_bytes(12))
    sent = 0
    with RawUdpSocket() as sock:
        for port in ports:
            if sent:
                await asyncio.sleep(interval)
            await sock.send(local_port, (address, port), payload)
            sent += 1
    return sent

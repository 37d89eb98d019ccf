"""The raw-socket UDP codec: header build, IPv4+UDP parse, reply filtering."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.discovery import rawudp
from agent.discovery.rawudp import (
    RawUdpSocket,
    UdpDatagram,
    build_udp_header,
    is_reply,
    parse_ipv4_udp,
    reply_filter,
    send_burst,
)
from relay.client.stun import build_binding_request, parse_binding_response
from relay.errors import UnexpectedMessage


def ipv4_packet(
    src: str, dst: str, udp: bytes, *, proto: int = 17, frag: int = 0, ihl: int = 5
) -> bytes:
    """An IPv4 header (checksum left 0: the parser does not check it) + ``udp``."""
    options = b"\x01" * (ihl * 4 - 20)
    total = ihl * 4 + len(udp)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl, 0, total, 0x1234, frag, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + options + udp


def test_header_layout() -> None:
    assert build_udp_header(51820, 3478, b"abc") == bytes.fromhex("ca6c0d96000b0000") + b"abc"


@pytest.mark.parametrize(("src", "dst"), [(0, 1), (1, 0), (65536, 1)])
def test_header_refuses_bad_ports(src: int, dst: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_udp_header(src, dst, b"")


def test_header_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError, match="too large"):
        build_udp_header(1, 2, bytes(65528))


def test_parse_round_trip_with_ip_options() -> None:
    udp = build_udp_header(3478, 51820, b"stun!")
    got = parse_ipv4_udp(ipv4_packet("198.51.100.2", "192.0.2.2", udp, ihl=6))
    assert got == UdpDatagram(("198.51.100.2", 3478), ("192.0.2.2", 51820), b"stun!")


def test_parse_trims_to_udp_length() -> None:
    udp = build_udp_header(1, 2, b"xy") + b"trailing"
    got = parse_ipv4_udp(ipv4_packet("10.0.0.1", "10.0.0.2", udp))
    assert got is not None and got.payload == b"xy"


IDS = "empty short tcp more-fragments offset short-udp udp-overrun udp-too-small ipv6 cut"


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45" + bytes(10),
        ipv4_packet("10.0.0.1", "10.0.0.2", build_udp_header(1, 2, b"x"), proto=6),
        ipv4_packet("10.0.0.1", "10.0.0.2", build_udp_header(1, 2, b"x"), frag=0x2000),
        ipv4_packet("10.0.0.1", "10.0.0.2", build_udp_header(1, 2, b"x"), frag=5),
        ipv4_packet("10.0.0.1", "10.0.0.2", b"\x00\x01\x00"),
        ipv4_packet("10.0.0.1", "10.0.0.2", struct.pack("!HHHH", 1, 2, 200, 0)),
        ipv4_packet("10.0.0.1", "10.0.0.2", struct.pack("!HHHH", 1, 2, 4, 0)),
        b"\x60" + bytes(47),  # IPv6
        ipv4_packet("10.0.0.1", "10.0.0.2", build_udp_header(1, 2, b"x"))[:-1],
    ],
    ids=IDS.split(),
)
def test_parse_refuses(packet: bytes) -> None:
    assert parse_ipv4_udp(packet) is None


@given(st.binary(max_size=80))
def test_parse_never_raises(packet: bytes) -> None:
    parse_ipv4_udp(packet)
    parse_ipv4_udp(b"\x45" + packet)


def test_is_reply_filters_source_and_port() -> None:
    reply = UdpDatagram(("198.51.100.2", 3478), ("192.0.2.2", 51820), b"")
    assert is_reply(reply, ("198.51.100.2", 3478), 51820)
    assert not is_reply(reply, ("198.51.100.2", 3479), 51820)
    assert not is_reply(reply, ("198.51.100.3", 3478), 51820)
    assert not is_reply(reply, ("198.51.100.2", 3478), 51821)


def test_stun_request_survives_the_udp_wrapping() -> None:
    txid, request = build_binding_request()
    datagram = parse_ipv4_udp(
        ipv4_packet("192.0.2.2", "198.51.100.2", build_udp_header(51820, 3478, request))
    )
    assert datagram is not None and datagram.payload == request
    with pytest.raises(UnexpectedMessage):
        parse_binding_response(datagram.payload, txid)  # a request is not a response


def test_exports() -> None:
    assert set(rawudp.__all__) == {
        "RawAnswer", "RawUdpSocket", "UdpDatagram", "build_udp_header", "is_reply",
        "parse_ipv4_udp", "raw_request", "raw_stun_query", "reply_filter", "send_burst",
    }  # fmt: skip


def run_bpf(program: bytes, packet: bytes) -> int:
    """A tiny classic-BPF interpreter for the instructions reply_filter uses."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    pc, a, x = 0, 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            a = struct.unpack_from("!I", packet, k)[0]
        elif code == 0xB1:
            x = 4 * (packet[k] & 0x0F)
        elif code == 0x48:
            a = struct.unpack_from("!H", packet, x + k)[0]
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


@pytest.mark.parametrize(
    ("src", "sport", "dport", "kept"),
    [
        ("198.51.100.1", 3478, 51820, True),
        ("198.51.100.2", 3478, 51820, False),
        ("198.51.100.1", 3479, 51820, False),
        ("198.51.100.1", 3478, 51821, False),
    ],
)
def test_reply_filter(src: str, sport: int, dport: int, kept: bool) -> None:
    program = reply_filter(("198.51.100.1", 3478), 51820)
    for ihl in (5, 7):
        packet = ipv4_packet(src, "192.0.2.2", build_udp_header(sport, dport, b"x"), ihl=ihl)
        assert (run_bpf(program, packet) != 0) is kept


@pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need CAP_NET_RAW")
async def test_kernel_applies_the_filter_on_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        with RawUdpSocket() as raw:
            raw.keep_only(("127.0.0.1", port), 40999)
            server.sendto(b"noise", ("127.0.0.1", 40998))
            server.sendto(b"reply", ("127.0.0.1", 40999))
            got = await asyncio.wait_for(raw.receive(), 2)
    assert got == UdpDatagram(("127.0.0.1", port), ("127.0.0.1", 40999), b"reply")


@pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need CAP_NET_RAW")
async def test_a_burst_leaves_from_the_given_port_to_each_port_in_turn() -> None:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2)
        ports = [sock.getsockname()[1] for sock in socks]
        sent = await send_burst("127.0.0.1", ports, 40996, 0.001)
        got = [sock.recvfrom(2048) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert sent == 3
    assert all(addr == ("127.0.0.1", 40996) and len(data) == 20 for data, addr in got)

"""Capturing a lab host's underlay with tcpdump, and a tiny pcap reader for the result."""

from __future__ import annotations

import ipaddress
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from lab.harness import GATEWAY_PORT, INTERNET_GATEWAY, WG_PORT, Host, Process, poll

# "wiregate-lab-OK!" as 16 bytes of ping padding: easy to spot in a capture.
PATTERN = b"wiregate-lab-OK!"


def start_capture(host: Host, path: Path) -> Process:
    proc = host.spawn(["tcpdump", "--immediate-mode", "-U", "-Z", "root", "-ni", host.ifname,
                       "-w", str(path)], name=f"tcpdump-{path.stem}")  # fmt: skip
    poll(lambda: "listening on" in proc.output(), timeout=15, what="tcpdump to start")
    time.sleep(1.0)  # "listening on" comes a moment before the socket sees packets
    return proc


def stop_capture(proc: Process, path: Path, min_frames: int) -> None:
    """Stop tcpdump once ``path`` holds ``min_frames`` large (> 200 bytes) frames, or after 5 s."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sum(len(f) > 200 for f in read_pcap(path)) >= min_frames:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    proc.signal(signal.SIGINT)
    proc.stop(timeout=5)


@dataclass(frozen=True, slots=True)
class Packet:
    """The parts of one captured IP packet the tests look at."""

    src: str
    dst: str
    proto: int  # 1 ICMP, 6 TCP, 17 UDP, 58 ICMPv6
    sport: int | None
    dport: int | None
    icmp_type: int | None
    frame: bytes


def read_pcap(path: Path) -> list[bytes]:
    """Ethernet frames of a classic pcap file (either byte order, µs or ns timestamps)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return []  # tcpdump has not written its header yet
    orders = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
              b"\xa1\xb2\x3c\x4d": ">"}  # fmt: skip
    order = orders.get(data[:4])
    assert order is not None, f"{path} is not a pcap file"
    (linktype,) = struct.unpack(order + "I", data[20:24])
    assert linktype == 1, f"expected an Ethernet capture, got link type {linktype}"
    frames, offset = [], 24
    while offset + 16 <= len(data):
        (incl,) = struct.unpack(order + "I", data[offset + 8 : offset + 12])
        frames.append(data[offset + 16 : offset + 16 + incl])
        offset += 16 + incl
    return frames


def parse_frame(frame: bytes) -> Packet | None:
    """An IPv4/IPv6 packet's addresses, protocol and ports; None for ARP and the like."""
    (ethertype,) = struct.unpack("!H", frame[12:14])
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        proto, l4 = frame[23], frame[14 + ihl :]
        src, dst = _ip(frame[26:30]), _ip(frame[30:34])
    elif ethertype == 0x86DD:
        proto, l4 = frame[20], frame[54:]
        src, dst = _ip(frame[22:38]), _ip(frame[38:54])
        if proto == 0 and len(l4) >= 2:  # hop-by-hop options (MLD reports)
            proto, l4 = l4[0], l4[(l4[1] + 1) * 8 :]
    else:
        return None
    sport = dport = icmp_type = None
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
    elif proto in (1, 58) and l4:
        icmp_type = l4[0]
    return Packet(src, dst, proto, sport, dport, icmp_type, frame)


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


# ICMPv6 link housekeeping on the veth (router/neighbour discovery, MLD): not user traffic.
ND_TYPES = {130, 131, 132, 133, 134, 135, 136, 143}


IGMP = 2


def is_control_plane(p: Packet) -> bool:
    """The agent's own HTTP/WebSocket stream to the gateway."""
    return (
        p.proto == 6 and INTERNET_GATEWAY in (p.src, p.dst) and GATEWAY_PORT in (p.sport, p.dport)
    )


def is_wireguard(p: Packet) -> bool:
    return p.proto == 17 and WG_PORT in (p.sport, p.dport)

"""The path-MTU prober's I/O: padded ICMP echoes with DF through the tunnel, the
kernel's cached PMTU of each peer's endpoint, and the loop the agent runs.

Decisions are :mod:`agent.pmtu.search`'s; this module only sends, waits and
reads. Probes go out of a raw ICMP socket bound to the WireGuard interface with
``IP_PMTUDISC_PROBE`` (DF set, the kernel's own PMTU cache ignored), one at a
time, so a search costs at most a dozen small round trips (a lost size waits
``timeout`` per try). A changed result is written into the packet filter's MSS
clamp (:attr:`agent.dataplane.firewall.Firewall.path_mtu`) by re-applying the map.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from agent.dataplane.backend import parse_endpoint
from agent.dataplane.facade import DataPlane
from agent.dataplane.mtu import OVERHEAD, underlay_mtu
from agent.pmtu.search import FLOOR, MtuSearch, PeerSeen, PmtuBook
from wiregate.logging import get_logger
from wiregate.model import NetMap

__all__ = ["PmtuProber", "echo", "endpoint_pmtu", "icmp_checksum"]

log = get_logger("agent.pmtu")

_PROBE = 3  # IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE: DF set, the PMTU cache ignored
_IP_MTU_DISCOVER = 10
_IPV6_MTU_DISCOVER = 23
_HEADER = {4: 20 + 8, 6: 40 + 8}  # IP + ICMP echo headers
_ECHO = {4: (8, 0), 6: (128, 129)}  # (request, reply) types

Echo = Callable[[str, str, int, float, int], bool]  # (interface, target, size, timeout, seq)


def icmp_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _request(version: int, ident: int, seq: int, size: int) -> bytes:
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[: size - _HEADER[version]]
    kind = _ECHO[version][0]
    packet = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    if version == 4:  # the kernel fills in ICMPv6 checksums itself
        packet = packet[:2] + struct.pack("!H", icmp_checksum(packet)) + packet[4:]
    return packet


def _is_reply(version: int, data: bytes, ident: int, seq: int) -> bool:
    if version == 4:
        data = data[(data[0] & 0x0F) * 4 :] if data else data
    if len(data) < 8:
        return False
    kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", data[:8])
    return kind == _ECHO[version][1] and (got_ident, got_seq) == (ident, seq)


def echo(interface: str, target: str, size: int, timeout: float, seq: int) -> bool:
    """Send one ``size``-byte echo with DF to ``target`` through ``interface``; True if
    its reply came back within ``timeout`` seconds (blocking; run it in a thread)."""
    version = ipaddress.ip_address(target).version
    family, proto = (
        (socket.AF_INET, socket.IPPROTO_ICMP)
        if version == 4
        else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    )
    level, option = (
        (socket.IPPROTO_IP, _IP_MTU_DISCOVER)
        if version == 4
        else (socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER)
    )
    ident = os.getpid() & 0xFFFF
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(level, option, _PROBE)
        try:
            sock.sendto(_request(version, ident, seq, size), (target, 0))
        except OSError:  # EMSGSIZE above the interface MTU, unreachable: lost
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, source = sock.recvfrom(65535)
            except (TimeoutError, OSError):
                return False
            if source[0] == target and _is_reply(version, data, ident, seq):
                return True
    return False


def endpoint_pmtu(endpoint: str | None, fwmark: int) -> tuple[int | None, int]:
    """(the underlay PMTU towards ``endpoint`` as the kernel has it now, its IP version)."""
    if not endpoint:
        return None, 4
    version = parse_endpoint(endpoint)[0].version
    with IPRoute() as ipr:
        found = underlay_mtu(ipr, endpoint, None, fwmark)
    return (None, version) if found is None else (found[0], version)


def _tunnel_target(netmap: NetMap | None, public_key: str) -> str | None:
    """The peer's tunnel address to probe: its first IPv4 address, else its first."""
    if netmap is None:
        return None
    for peer in netmap.peers.values():
        if peer.public_key == public_key and peer.addresses:
            hosts = [a.split("/")[0] for a in peer.addresses]
            return next((h for h in hosts if ":" not in h), hosts[0])
    return None


class PmtuProber:
    """Probes one peer at a time, every ``tick`` seconds at most, as :class:`PmtuBook` says."""

    def __init__(
        self,
        dataplane: DataPlane,
        current_map: Callable[[], NetMap | None],
        apply: Callable[[NetMap], Awaitable[None]],
        *,
        fwmark: int,
        interval: float = 600.0,
        tick: float = 5.0,
        timeout: float = 1.0,
        send: Echo | None = None,
        underlay: Callable[[str | None, int], tuple[int | None, int]] = endpoint_pmtu,
        link_mtu: Callable[[str], int] | None = None,
    ) -> None:
        """``send``, ``underlay`` and ``link_mtu`` replace the probe's I/O (tests)."""
        self._echo = send or echo
        self._underlay = underlay
        self._link_mtu = link_mtu or _link_mtu
        self.dataplane = dataplane
        self.book = PmtuBook(interval=interval, retry=min(60.0, interval))
        self._map = current_map
        self._apply = apply
        self.fwmark = fwmark
        self.tick = tick
        self.timeout = timeout
        self._seq = 0
        self.rtt_ms: dict[str, float] = {}  # by public key: the fastest echo of the last search

    async def run(self) -> None:
        """Forever: pick the peer due, search its path MTU, re-clamp if it changed."""
        while True:
            try:
                await self.step(time.time())
            except OSError as exc:
                log.warning("path-MTU probe failed", error=str(exc))
            await asyncio.sleep(self.tick)

    async def step(self, now: float) -> bool:
        """Probe the peer due now, if any; True if a path MTU changed (and was applied)."""
        netmap = self._map()
        live = await asyncio.to_thread(self.dataplane.status)
        seen = [PeerSeen(p.public_key, p.endpoint, p.last_handshake) for p in live]
        if netmap is not None:
            self.book.forget_except(p.public_key for p in netmap.peers.values())
            self.rtt_ms = {k: v for k, v in self.rtt_ms.items() if k in self.book.results}
        peer = self.book.due(seen, now)
        target = None if peer is None else _tunnel_target(netmap, peer.public_key)
        if peer is None or target is None:
            return False
        search = await asyncio.to_thread(self._search, peer, target)
        changed = self.book.record(peer, search, time.time())
        log.info("path MTU", peer=peer.public_key, **self.book.results[peer.public_key].to_dict())
        current = self._map()  # the search took seconds: a newer map may have come meanwhile
        if changed and current is not None:
            self.dataplane.firewall.path_mtu = self.book.path_mtus()
            await self._apply(current)
        return changed

    def _search(self, peer: PeerSeen, target: str) -> MtuSearch:
        _, version = self._underlay(peer.endpoint, self.fwmark)
        inner = ipaddress.ip_address(target).version
        ceiling = self._link_mtu(self.dataplane.interface)
        search = MtuSearch(ceiling=ceiling, floor=FLOOR[inner], overhead=OVERHEAD[version])
        fastest: float | None = None
        while (size := search.next_size()) is not None:
            self._seq = (self._seq + 1) & 0xFFFF
            sent = time.monotonic()
            ok = self._echo(self.dataplane.interface, target, size, self.timeout, self._seq)
            took = (time.monotonic() - sent) * 1000
            underlay, _ = self._underlay(peer.endpoint, self.fwmark)
            if ok:
                search.reply(size, underlay)
                fastest = took if fastest is None else min(fastest, took)
            else:
                search.lost(size, underlay)
        if fastest is not None:
            self.rtt_ms[peer.public_key] = round(fastest, 3)
        return search

    def peer_doc(self, public_key: str) -> dict[str, Any]:
        """``path_mtu`` (None until probed) and the last probe, for a status peer entry."""
        result = self.book.results.get(public_key)
        return {
            "path_mtu": None if result is None else result.path_mtu,
            "pmtu": None if result is None else result.to_dict(),
        }

    def to_dict(self) -> dict[str, object]:
        """The counters for the status document."""
        return self.book.to_dict()


def _link_mtu(interface: str) -> int:
    return int(Path(f"/sys/class/net/{interface}/mtu").read_text().strip())

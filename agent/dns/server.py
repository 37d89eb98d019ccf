"""The mesh domain's DNS server: UDP and TCP on the device's tunnel addresses (asyncio).

Each datagram (or TCP message) goes to :meth:`agent.dns.zone.Responder.respond`;
a :class:`~agent.dns.zone.Reply` is sent back at once, a
:class:`~agent.dns.zone.Forward` is asked of a split zone's nameservers (over the
tunnel) or of the host's upstream resolver, and their answer relayed.

Only this host asks: a query is answered when its source is one of the addresses
the server listens on (the host asking itself), loopback, or in ``allow`` (e.g.
a node's pod CIDR). The kernel drops packets from outside that claim a local
source address (martian), and WireGuard accepts from a peer only the peer's own
allowed IPs, so the source check cannot be passed by spoofing from the underlay
or the tunnel. A peer asking gets nothing: the answers are this device's view.

The sockets are bound with ``IP_FREEBIND``/``IPV6_FREEBIND``, so the server can
start before the tunnel addresses are configured (or while IPv6 is still in DAD).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message

from agent.dns.zone import Forward, Reply, Responder, Zone
from wiregate.errors import LocalError
from wiregate.logging import get_logger

__all__ = ["DnsServer", "ForwardFn", "forward_query"]

log = get_logger("agent.dns")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78  # linux/in6.h; not exported by Python's socket module
MAX_FORWARDS = 256  # queries awaiting an upstream at once; past this: SERVFAIL
MAX_TCP = 64  # open TCP connections
TCP_IDLE = 10.0  # seconds a TCP connection may wait for its next query
FORWARD_TIMEOUT = 2.0  # seconds per nameserver
BATCH = 256  # datagrams read per wake-up of the loop
UDP_BUFFER = 4096  # the largest query read (EDNS payloads past it are not queries)
SOCKET_BUFFER = 1 << 20

ForwardFn = Callable[[dns.message.Message, Sequence[str], bool], Awaitable[bytes | None]]


async def forward_query(
    query: dns.message.Message, servers: Sequence[str], tcp: bool
) -> bytes | None:
    """Ask ``servers`` in turn (UDP, or TCP for a TCP asker); their answer's bytes, or None."""
    for server in servers:
        try:
            if tcp:
                answer = await dns.asyncquery.tcp(query, server, timeout=FORWARD_TIMEOUT)
            else:
                answer = await dns.asyncquery.udp(query, server, timeout=FORWARD_TIMEOUT)
            return answer.to_wire(max_size=65535)
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            log.debug("nameserver did not answer", server=server, error=str(exc))
    return None


@dataclass
class DnsServer:
    """UDP and TCP listeners on ``port`` of the given addresses, answering from a zone."""

    port: int = 53
    allow: Sequence[str] = ()  # CIDRs that may ask, besides this host
    forward: ForwardFn = forward_query
    upstreams: tuple[str, ...] = ()  # the host's resolver, for names not the mesh's
    responder: Responder | None = None
    addresses: tuple[str, ...] = ()
    _local: set[str] = field(default_factory=set)
    _networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    _udp: list[_UdpListener] = field(default_factory=list)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _forwards: set[asyncio.Task[None]] = field(default_factory=set)
    _tcp_open: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"answered": 0, "forwarded": 0,
                                                             "refused_source": 0})  # fmt: skip

    def __post_init__(self) -> None:
        self._networks = [ipaddress.ip_network(c) for c in self.allow]

    def set_zone(self, zone: Zone) -> None:
        """Answer from ``zone`` from now on (a fresh answer cache)."""
        self.responder = Responder(zone)

    async def listen(self, addresses: Sequence[str]) -> None:
        """Listen on ``addresses`` (UDP and TCP), closing what listened elsewhere."""
        wanted = tuple(addresses)
        if wanted == self.addresses and self._udp:
            return
        await self.close()
        loop = asyncio.get_running_loop()
        try:
            for address in wanted:
                listener = _UdpListener(_socket(address, self.port, socket.SOCK_DGRAM), self)
                listener.start(loop)
                self._udp.append(listener)
                tcp = _socket(address, self.port, socket.SOCK_STREAM)
                tcp.listen(64)
                self._servers.append(await asyncio.start_server(self._tcp_client, sock=tcp))
        except OSError as exc:
            await self.close()
            raise LocalError(f"DNS server cannot listen on port {self.port}: {exc}") from None
        self.addresses = wanted
        self._local = {*wanted, "127.0.0.1", "::1"}
        log.info("DNS server listening", addresses=list(wanted), port=self.port)

    async def close(self) -> None:
        """Stop listening; queries being forwarded are dropped."""
        for listener in self._udp:
            listener.close()
        for server in self._servers:
            server.close()
        for task in list(self._forwards):
            task.cancel()
        if self._servers:
            await asyncio.sleep(0)  # the loop closes the sockets on its next turn
        self._udp, self._servers, self.addresses = [], [], ()

    def allow_also(self, cidrs: Sequence[str]) -> None:
        """Answer sources in ``cidrs`` too (a node's pod CIDRs, learned from its Node)."""
        for cidr in cidrs:
            network = ipaddress.ip_network(cidr)
            if network not in self._networks:
                self._networks.append(network)
                log.info("DNS answers a pod CIDR", cidr=str(network))

    def allowed(self, source: str) -> bool:
        """Whether a query from ``source`` is answered (this host, or ``allow``)."""
        if source in self._local:
            return True
        if self._networks:
            try:
                ip = ipaddress.ip_address(source.split("%", 1)[0])
            except ValueError:
                return False
            return any(ip in net for net in self._networks)
        return False

    def handle(self, data: bytes, later: Callable[[bytes], None], *, tcp: bool) -> bytes | None:
        """The answer to ``data`` now, or None: no answer, or one sent through ``later``
        once a forwarded query comes back."""
        responder = self.responder
        if responder is None:
            return None
        outcome = responder.respond(data, max_size=65535 if tcp else None)
        if outcome is None:
            return None
        if type(outcome) is Reply:
            self.counts["answered"] += 1
            return outcome.wire
        assert isinstance(outcome, Forward)
        servers = self.upstreams if outcome.servers is None else outcome.servers
        if not servers or len(self._forwards) >= MAX_FORWARDS:
            return outcome.fail
        self.counts["forwarded"] += 1
        task = asyncio.get_running_loop().create_task(self._relay(outcome, servers, later, tcp))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)
        return None

    async def _relay(
        self, outcome: Forward, servers: Sequence[str], later: Callable[[bytes], None], tcp: bool
    ) -> None:
        answer = await self.forward(outcome.query, servers, tcp)
        later(outcome.fail if answer is None else answer)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._tcp_open >= MAX_TCP or not peer or not self.allowed(peer[0]):
            self.counts["refused_source"] += 0 if self._tcp_open >= MAX_TCP else 1
            writer.close()
            return
        self._tcp_open += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                data = await asyncio.wait_for(reader.readexactly(int.from_bytes(head)), TCP_IDLE)
                wire = self.handle(data, lambda w: writer.write(len(w).to_bytes(2) + w), tcp=True)
                if wire is not None:
                    writer.write(len(wire).to_bytes(2) + wire)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_open -= 1
            writer.close()

    def to_dict(self) -> dict[str, Any]:
        """What ``wiregate status`` shows of the server."""
        zone = self.responder.zone if self.responder is not None else None
        listen = [f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}" for a in self.addresses]
        return {
            "domain": zone.origin.to_text(omit_final_dot=True) if zone else None,
            "listen": listen,
            "names": len(zone.hosts) if zone else 0,
            "left_out": list(zone.left_out) if zone else [],
            "zones": [z.to_text(omit_final_dot=True) for z, _ in zone.zones] if zone else [],
            "upstreams": list(self.upstreams),
            **self.counts,
        }


class _UdpListener:
    """One UDP socket, drained from a reader callback of the loop: up to :data:`BATCH`
    queries per wake-up, each answered at once (no transport, no per-datagram task)."""

    def __init__(self, sock: socket.socket, server: DnsServer) -> None:
        self._sock, self._server = sock, server
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(OSError):  # a bigger queue rides out bursts; best effort
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        server, sock = self._server, self._sock
        recv, send, allowed, handle = sock.recvfrom, sock.sendto, server.allowed, server.handle
        for _ in range(BATCH):  # then yield to the loop, even under a flood
            try:
                data, addr = recv(UDP_BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error queued on the socket, for one
                log.debug("DNS socket error", error=str(exc))
                continue
            if not allowed(addr[0]):
                server.counts["refused_source"] += 1
                continue
            wire = handle(data, partial(self._send, addr), tcp=False)
            if wire is not None:
                with contextlib.suppress(OSError):  # a full send buffer drops it, as UDP may
                    send(wire, addr)

    def _send(self, addr: tuple[str, int], wire: bytes) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendto(wire, addr)

    def close(self) -> None:
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def _socket(address: str, port: int, kind: socket.SocketKind) -> socket.socket:
    v6 = ":" in address
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:  # a restart binds again past TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock

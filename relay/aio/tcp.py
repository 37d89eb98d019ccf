"""WireGuard over TLS/TCP: the relay's stream listener, bridged onto its UDP ports.

Where a network lets only TCP 443 out, an agent opens TLS to ``tcp_listen`` and
writes :mod:`relay.streamwire` frames: each carries one datagram for one of the
relay's UDP ports (the control port, or an allocation's relay port). Each
connection gets its own UDP socket on loopback (its *bridge*): the client's
datagrams enter the relay's forwarder as if they had come from that socket on
the port the frame names, and whatever the relay sends to the socket is framed
back. So the relay's one core does everything as for UDP: tickets, the
return-routability cookie (it reaches the bridge, hence the TCP client),
binding, quotas, WireGuard's shape and mac1. The core admits exactly the
registered bridge sources that its loopback rule would refuse, and rate limits
each as its TCP client's address (:attr:`relay.forwarding.Relay.bridges`). A
bridge's side forwards to a UDP side or to another bridge (both sides on TCP).

Per connection: TCP_NODELAY, large socket buffers, a bounded queue of frames
waiting for the TLS transport (when it is full the oldest frame is dropped:
WireGuard recovers a lost datagram, a stalled stream delays all of them), an
idle timeout, and a handshake timeout covering TLS and the preamble. Bad input
gets one :class:`~relay.streamwire.Refusal` frame with one line, a log line, and
the connection closed; nothing reaches the core. At most ``max_connections``.

:class:`~relay.client.framed.FramedStream` is the framing half shared with the
agent's link (:mod:`agent.paths.tcplink`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.aio.forwarding import RelayForwarder
from relay.client.framed import QUEUE_FRAMES, DrainedUdp, FramedStream
from relay.filters import normalize_ip
from relay.streamwire import Datagram, Frame, Refusal, StreamError
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.files import credential_path
from wiregate.logging import get_logger
from wiregate.net import parse_hostport
from wiregate.settings import RelaySettings
from wiregate.tls import CertReloader, server_context

__all__ = ["TcpBridgeServer", "TcpSettings", "tcp_from_settings"]

log = get_logger("relay.tcp")


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """The TCP/TLS listener: where, with which certificate, and its limits."""

    host: str
    port: int
    cert: Path
    key: Path
    max_connections: int = 1024
    max_per_client: int = 64  # connections from one client address
    idle_timeout: float = 120.0
    handshake_timeout: float = 10.0
    queue_frames: int = QUEUE_FRAMES


def tcp_from_settings(settings: RelaySettings) -> TcpSettings | None:
    """The listener's settings, None when ``tcp_listen`` is empty."""
    if not settings.tcp_listen:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("tcp_listen needs tls_cert and tls_key")
    host, port = parse_hostport(settings.tcp_listen, allow_port_zero=True, what="tcp_listen")
    return TcpSettings(
        host=host,
        port=port,
        cert=credential_path(settings.tls_cert, "tls_cert"),
        key=credential_path(settings.tls_key, "tls_key"),
        max_connections=settings.tcp_max_connections,
        idle_timeout=settings.tcp_idle_timeout,
    )


class _Connection(FramedStream):
    """One client: frames to the relay's ports through its bridge socket, and back."""

    def __init__(self, server: TcpBridgeServer) -> None:
        super().__init__(preamble=True, queue_frames=server.settings.queue_frames)
        self._server = server
        self._udp: DrainedUdp | None = None
        self._bridge: tuple[str, int] | None = None
        self._client = ""
        self._started = False
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self._client = str(peer[0])
        server = self._server
        server.connections.add(self)
        server.counters["connections"] += 1
        if len(server.connections) > server.settings.max_connections:
            server.counters["refused_full"] += 1
            self.refuse("relay refused: too many TCP connections")
            return
        mine = sum(1 for c in server.connections if c._client == self._client)
        if mine > server.settings.max_per_client:
            server.counters["refused_full"] += 1
            self.refuse("relay refused: too many TCP connections from this address")
            return
        self._arm(server.settings.handshake_timeout)
        self._open_bridge()

    def _open_bridge(self) -> None:
        try:
            self._udp = DrainedUdp.bind(_loopback_for(self._server.target_host), self.from_relay)
        except OSError as exc:
            self.refuse(f"relay refused: no bridge socket ({exc.strerror})")
            return
        self._bridge = self._udp.address
        self._server.register(self._bridge, self._client)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        settings = self._server.settings
        if not self._started:
            self._server.counters["refused_handshake_timeout"] += 1
            self.refuse(f"relay refused: no preamble within {settings.handshake_timeout:g} s")
            return
        idle = time.monotonic() - self._last
        if idle >= settings.idle_timeout:
            self._server.counters["idle_closed"] += 1
            self.refuse(f"relay closed an idle stream ({settings.idle_timeout:g} s)")
            return
        self._arm(settings.idle_timeout - idle)

    def data_received(self, data: bytes) -> None:
        self._last = time.monotonic()
        super().data_received(data)
        if not self._started and not self.decoder.awaiting_preamble:
            self._started = True
            self._arm(self._server.settings.idle_timeout)

    def frame_received(self, frame: Frame) -> None:
        if isinstance(frame, Refusal):
            self.close()
            return
        if frame.port not in self._server.ports:
            self._server.counters["refused_port"] += 1
            self.refuse(f"relay refused: port {frame.port} is not one of this relay's UDP ports")
            return
        self._to_relay(frame)

    def _to_relay(self, frame: Datagram) -> None:
        # straight into the forwarder, as if it had arrived from the bridge socket on that
        # port (one hop less); what the relay sends back goes to the bridge socket
        if self._bridge is not None:
            self._server.forwarder.received(frame.data, self._bridge, frame.port)

    def from_relay(self, data: bytes, src: tuple[str, int]) -> None:
        """What the relay sent to this connection's bridge socket: framed to the client."""
        server = self._server
        host, port = src
        if port not in server.ports or host != server.target_host:
            return  # not the relay: nobody else should know this loopback port
        self.send(Datagram(port, data))

    def bad_stream(self, exc: StreamError) -> None:
        self._server.counters["refused_stream"] += 1
        super().bad_stream(exc)

    def refuse(self, reason: str) -> None:
        if "idle" not in reason:
            log.info("tcp stream refused", client=self._client, reason=reason)
        super().refuse(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._bridge is not None:
            self._server.unregister(self._bridge)
        self._server.connections.discard(self)
        self._server.counters["dropped_frames"] += self.dropped


#: What :attr:`TcpBridgeServer.counters` counts (``wiregate_relay_tcp_events_total{event}``).
TCP_EVENTS = (
    "connections",
    "refused_full",
    "refused_handshake_timeout",
    "refused_port",
    "refused_stream",
    "idle_closed",
    "dropped_frames",
)


class _TcpCollector(Collector):
    """``wiregate_relay_tcp_connections`` (open now) and ``wiregate_relay_tcp_events_total``."""

    def __init__(self, server: TcpBridgeServer) -> None:
        self._server = server

    def collect(self) -> Iterable[Metric]:
        server = self._server
        live = GaugeMetricFamily(
            "wiregate_relay_tcp_connections", "TLS/TCP connections open now (tcp_listen)."
        )
        live.add_metric([], len(server.connections))
        yield live
        events = CounterMetricFamily(
            "wiregate_relay_tcp_events",
            "TLS/TCP connections accepted, refused (by reason), closed idle, frames dropped.",
            labels=["event"],
        )
        dropped = sum(c.dropped for c in server.connections)
        for event in TCP_EVENTS:
            extra = dropped if event == "dropped_frames" else 0
            events.add_metric([event], server.counters[event] + extra)
        yield events


def _loopback_for(host: str) -> str:
    return "::1" if ":" in host else "127.0.0.1"


class TcpBridgeServer:
    """The TLS listener; ``start()`` after the forwarder has started, ``close()`` to stop."""

    def __init__(
        self,
        settings: TcpSettings,
        forwarder: RelayForwarder,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings, self.forwarder, self._clock = settings, forwarder, clock
        if registry is not None:
            registry.register(_TcpCollector(self))
        self.connections: set[_Connection] = set()
        self.counters: Counter[str] = Counter()
        self.address: tuple[str, int] | None = None
        self.target_host = "127.0.0.1"
        self.ports: frozenset[int] = frozenset()
        self.reloader: CertReloader | None = None
        self._server: asyncio.Server | None = None
        self._reload_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the certificate and listen; ConfigError (one line) if either fails."""
        control = self.forwarder.control_address
        if control is None:
            raise ConfigError("the TCP transport needs the relay's UDP ports bound first")
        self.target_host = _target(control[0])
        self.ports = frozenset((control[1], *self.forwarder.relay_ports))
        s = self.settings
        ctx = server_context(s.cert, s.key)
        self.reloader = CertReloader(ctx, s.cert, s.key)
        self._server = await self._listen(ctx)
        sock = self._server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        self._reload_task = asyncio.get_running_loop().create_task(self.reloader.run())
        log.info("relay tcp listening", address=self.address)

    async def _listen(self, ctx: ssl.SSLContext) -> asyncio.Server:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(
                lambda: _Connection(self),
                s.host,
                s.port,
                ssl=ctx,
                ssl_handshake_timeout=s.handshake_timeout,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on TCP {s.host}:{s.port}: {exc.strerror}",
                hint="is another process using that port, or is the address not on this host?",
            ) from exc

    def register(self, bridge: tuple[str, int], client: str) -> None:
        """Let the core admit ``bridge`` (a loopback source) as TCP client ``client``."""
        core = self.forwarder.core
        if core is not None:
            try:
                ip = normalize_ip(client)
            except ValueError:
                ip = normalize_ip(bridge[0])
            core.bridges[bridge] = ip

    def unregister(self, bridge: tuple[str, int]) -> None:
        """The connection is gone: its bridge source is refused again."""
        core = self.forwarder.core
        if core is not None:
            core.bridges.pop(bridge, None)

    async def close(self) -> None:
        """Stop listening and close every connection; safe to call twice."""
        if self._reload_task is not None:
            self._reload_task.cancel()
            self._reload_task = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


def _target(host: str) -> str:
    """Where the bridges send: the relay's own address, or loopback if it listens on any."""
    try:
        ip = normalize_ip(host)
    except ValueError:
        return "127.0.0.1"
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return str(ip)

"""The relay process's asyncio glue: STUN listeners and the metrics listener.

One :class:`StunListener` per ``stun_listen`` address feeds batches of datagrams
(``recvmmsg`` through :class:`~relay.aio.batchio.BatchSocket`) to the shared sans-IO
:class:`~relay.stun_core.StunServer` and sends back whatever it returns in one
``sendmmsg``; nothing else happens here. Metrics (Prometheus text) and ``/livez`` are
served on ``metrics_listen``, never on the STUN ports. With
:class:`~relay.aio.forwarding.ForwardingSettings`, the WireGuard relay's control
and relay ports are bound too and served by :class:`~relay.aio.forwarding.RelayForwarder`;
with a ``signers_url`` there, a :class:`~relay.aio.signers.SignersWatcher` keeps
the forwarder's signers in step with the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay.aio.batchio import BatchSocket
from relay.aio.forwarding import ForwardingSettings, RelayForwarder
from relay.aio.signers import SignersWatcher
from relay.aio.tcp import TcpBridgeServer, tcp_from_settings
from relay.metrics import StunMetrics
from relay.stun_core import Addr, RateLimiter, StunServer
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.logging import get_logger
from wiregate.net import parse_hostport
from wiregate.settings import RelaySettings

__all__ = ["RelayServer", "StunListener", "StunTally", "run_relay"]

log = get_logger("relay")


class StunListener:
    """One STUN listener: datagrams in by the batch (``recvmmsg``), ``core.handle_batch``,
    the replies out by the batch (``sendmmsg``) on the same socket."""

    def __init__(
        self,
        sock: socket.socket,
        core: StunServer,
        local: Addr,
        clock: Clock,
        tally: StunTally,
    ) -> None:
        self._sock, self._io = sock, BatchSocket(sock)
        self._v6 = sock.family == socket.AF_INET6  # an IPv4 socket only answers IPv4
        self._core, self._local, self._clock, self._tally = core, local, clock, tally
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the socket from ``loop`` (a reader callback; nothing runs in between)."""
        with contextlib.suppress(OSError):  # bigger queues ride out bursts; best effort
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        self._loop = loop
        loop.add_reader(self._io.fileno(), self._readable)

    def _readable(self) -> None:
        now = self._clock()
        for _ in range(_ROUNDS):  # then yield to the loop, even under a flood
            try:
                batch = self._io.recv_batch(_BATCH)
            except OSError as exc:
                log.debug("stun socket error", local=self._local, error=str(exc))
                return
            if not batch:
                return
            drained = len(batch) < _BATCH  # the queue is empty: no need to ask again
            replies = self._core.handle_batch(batch, self._local, now)
            if replies:
                sent = replies[: self._io.send_batch(replies)]  # a full buffer drops the rest
                six = sum(1 for _, (host, _port) in sent if _is_ipv6(host)) if self._v6 else 0
                self._tally.replied(self._local, len(sent) - six, six)
            if drained:
                return

    def close(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class StunTally(Collector):
    """The STUN counters as plain integers on the hot path, handed to
    :class:`~relay.metrics.StunMetrics` whenever the registry is collected (a
    scrape): no metrics call per datagram or per batch. Register it before the
    counters it feeds, so a scrape sees everything counted until then."""

    def __init__(self) -> None:
        self.metrics: StunMetrics | None = None
        self._outcomes: dict[str, int] = {}
        self._replies: dict[Addr, tuple[int, int]] = {}

    def observe(self, outcome: str, count: int) -> None:
        """The core's ``observe`` callback."""
        self._outcomes[outcome] = self._outcomes.get(outcome, 0) + count

    def replied(self, local: Addr, ipv4: int, ipv6: int) -> None:
        """Replies sent from ``local``'s listener, by family."""
        four, six = self._replies.get(local, (0, 0))
        self._replies[local] = (four + ipv4, six + ipv6)

    def flush(self) -> None:
        """Hand what was counted to the Prometheus counters."""
        if self.metrics is None:
            return
        outcomes, self._outcomes = self._outcomes, {}
        for outcome, count in outcomes.items():
            self.metrics.observe(outcome, count)
        replies, self._replies = self._replies, {}
        for local, (four, six) in replies.items():
            self.metrics.replies("ipv4", local, four)
            self.metrics.replies("ipv6", local, six)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self.flush()
        return []


_BATCH = 64  # datagrams per recvmmsg
_ROUNDS = 16  # batches per wake-up
_SOCKET_BUFFER = 4 << 20


def _is_ipv6(host: str) -> bool:
    """An IPv6 destination (an IPv4-mapped one counts as IPv4, as in the metrics)."""
    return ":" in host and not host.startswith("::ffff:")


class RelayServer:
    """The relay's listeners; ``start()`` binds them, ``close()`` releases them."""

    def __init__(
        self,
        settings: RelaySettings,
        *,
        limiter: RateLimiter | None = None,
        forwarding: ForwardingSettings | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._settings, self._limiter, self._forwarding = settings, limiter, forwarding
        self.registry = CollectorRegistry()
        self._tally = StunTally()  # registered first: a collection flushes it, then reads
        self.registry.register(self._tally)
        self._stun = self._tally.metrics = StunMetrics(self.registry)
        self._listeners: list[StunListener] = []
        self.forwarder = (
            RelayForwarder(forwarding, self.registry, clock=clock) if forwarding else None
        )
        self.signers: SignersWatcher | None = None
        self.tcp: TcpBridgeServer | None = None  # WireGuard over TLS (tcp_listen)
        self._runner: web.AppRunner | None = None
        self.stun_addresses: list[Addr] = []
        self.metrics_address: Addr | None = None

    async def start(self) -> None:
        """Bind every STUN address, then the metrics listener."""
        try:
            await self._start_stun()
            await self._start_forwarding()
            await self._start_metrics()
        except BaseException:
            await self.close()
            raise
        log.info("relay listening", stun=self.stun_addresses, metrics=self.metrics_address)

    async def _start_stun(self) -> None:
        socks = await _bind_all(
            [
                parse_hostport(a, allow_port_zero=True, what="stun_listen")
                for a in self._settings.stun_listen
            ]
        )
        self.stun_addresses = [_sockname(s) for s in socks]
        limiter = self._limiter or _stun_limiter(self._settings)
        core = StunServer(self.stun_addresses, limiter=limiter, observe=self._tally.observe)
        loop = asyncio.get_running_loop()
        for sock, local in zip(socks, self.stun_addresses, strict=True):
            self._stun.listening(local)
            listener = StunListener(sock, core, local, loop.time, self._tally)
            listener.start(loop)
            self._listeners.append(listener)

    async def _start_forwarding(self) -> None:
        if self.forwarder is None or self._forwarding is None:
            return
        fwd = self._forwarding
        ports = (fwd.control_port, *fwd.relay_ports)
        await self.forwarder.start(await _bind_all([(fwd.host, p) for p in ports]))
        tcp = tcp_from_settings(self._settings)
        if tcp is not None:
            self.tcp = TcpBridgeServer(tcp, self.forwarder, registry=self.registry)
            await self.tcp.start()
        if fwd.signers_url:
            self.signers = SignersWatcher(
                fwd.signers_url,
                self.forwarder.set_verify_keys,
                ca_file=fwd.signers_ca_file,
                refresh=fwd.signers_refresh,
                retry=fwd.signers_retry,
                revoke=self.forwarder.revoke,
                revocations_refresh=fwd.revocations_refresh,
            )
            self.signers.start()

    async def _start_metrics(self) -> None:
        if not self._settings.metrics_listen:  # "": no metrics listener
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", _livez)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = parse_hostport(
            self._settings.metrics_listen, allow_port_zero=True, what="metrics_listen"
        )
        await web.TCPSite(self._runner, host, port).start()
        self.metrics_address = _pair(self._runner.addresses[0])

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        """Close every listener; safe to call twice."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self.signers is not None:
            await self.signers.close()
        if self.tcp is not None:
            await self.tcp.close()
        if self.forwarder is not None:
            await self.forwarder.close_kernel()  # the kernel's rules go with the relay
            self.forwarder.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _stun_limiter(settings: RelaySettings) -> RateLimiter:
    return RateLimiter(
        settings.stun_rate,
        settings.stun_burst,
        global_rate=settings.stun_global_rate,
        global_burst=settings.stun_global_burst,
    )


async def _livez(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _pair(sockname: Any) -> Addr:
    return str(sockname[0]), int(sockname[1])


def _sockname(sock: socket.socket) -> Addr:
    return _pair(sock.getsockname())


async def _bind_all(addrs: list[Addr]) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for addr in addrs:
            socks.append(await _bind_udp(addr))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _bind_udp(addr: Addr) -> socket.socket:
    """A UDP socket bound to ``addr``; a refused bind is a configuration error."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(*addr, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on UDP {addr[0]}:{addr[1]}: {exc}") from exc
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on UDP {addr[0]}:{addr[1]}: {exc.strerror}",
            hint="is another process using that port, or is the address not on this host?",
        ) from exc
    sock.setblocking(False)
    return sock


async def run_relay(
    settings: RelaySettings,
    *,
    on_ready: Callable[[RelayServer], None] | None = None,
    forwarding: ForwardingSettings | None = None,
    clock: Clock = time.time,
) -> None:
    """Serve STUN on every ``settings.stun_listen`` address, the WireGuard relay if
    ``forwarding`` is given, and metrics on ``settings.metrics_listen`` until
    SIGTERM or SIGINT (then close every listener and return) or cancelled.
    ``on_ready`` gets the started server (its bound addresses, useful with port 0)."""
    server = RelayServer(settings, forwarding=forwarding, clock=clock)
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        await _until_signalled()
        log.info("relay stopping")
    finally:
        await server.close()
    log.info("relay stopped")


async def _until_signalled() -> None:
    """Wait for SIGTERM or SIGINT (or for cancellation)."""
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
    except (RuntimeError, ValueError):  # not the main thread: cancellation only
        pass
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)

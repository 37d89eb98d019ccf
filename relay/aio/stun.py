"""The relay process's asyncio glue: STUN listeners and the metrics listener.

One :class:`StunProtocol` per ``stun_listen`` address feeds datagrams to the
shared sans-IO :class:`~relay.stun_core.StunServer` and sends back whatever it
returns; nothing else happens here. Metrics (Prometheus text) and ``/livez`` are
served on ``metrics_listen``, never on the STUN ports. With
:class:`~relay.aio.forwarding.ForwardingSettings`, the WireGuard relay's control
and relay ports are bound too and served by :class:`~relay.aio.forwarding.RelayForwarder`;
with a ``signers_url`` there, a :class:`~relay.aio.signers.SignersWatcher` keeps
the forwarder's signers in step with the gateway.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.aio.forwarding import ForwardingSettings, RelayForwarder
from relay.aio.signers import SignersWatcher
from relay.metrics import StunMetrics
from relay.stun_core import Addr, RateLimiter, StunServer
from wiregate.clock import Clock
from wiregate.errors import ConfigError
from wiregate.logging import get_logger
from wiregate.net import parse_hostport
from wiregate.settings import RelaySettings

__all__ = ["RelayServer", "StunProtocol", "run_relay"]

log = get_logger("relay")


class StunProtocol(asyncio.DatagramProtocol):
    """One STUN listener: datagram in, ``core.handle``, reply out on the same socket."""

    def __init__(self, core: StunServer, local: Addr, clock: Clock, metrics: StunMetrics) -> None:
        self._core, self._local, self._clock, self._metrics = core, local, clock, metrics
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self._core.handle(data, (str(addr[0]), int(addr[1])), self._local, self._clock())
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)
            self._metrics.replied((str(addr[0]), int(addr[1])), self._local)

    def error_received(self, exc: Exception) -> None:
        log.debug("stun socket error", local=self._local, error=str(exc))


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
        self._stun = StunMetrics(self.registry)
        self._transports: list[asyncio.DatagramTransport] = []
        self.forwarder = (
            RelayForwarder(forwarding, self.registry, clock=clock) if forwarding else None
        )
        self.signers: SignersWatcher | None = None
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
        core = StunServer(self.stun_addresses, limiter=self._limiter, observe=self._stun.observe)
        loop = asyncio.get_running_loop()
        for sock, local in zip(socks, self.stun_addresses, strict=True):
            self._stun.listening(local)
            factory = functools.partial(StunProtocol, core, local, loop.time, self._stun)
            transport, _ = await loop.create_datagram_endpoint(factory, sock=sock)
            self._transports.append(transport)

    async def _start_forwarding(self) -> None:
        if self.forwarder is None or self._forwarding is None:
            return
        fwd = self._forwarding
        ports = (fwd.control_port, *fwd.relay_ports)
        await self.forwarder.start(await _bind_all([(fwd.host, p) for p in ports]))
        if fwd.signers_url:
            self.signers = SignersWatcher(
                fwd.signers_url,
                self.forwarder.set_verify_keys,
                ca_file=fwd.signers_ca_file,
                refresh=fwd.signers_refresh,
                retry=fwd.signers_retry,
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
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        if self.signers is not None:
            await self.signers.close()
        if self.forwarder is not None:
            self.forwarder.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


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
    cancelled. ``on_ready`` gets the started server (its bound addresses, useful
    with port 0)."""
    server = RelayServer(settings, forwarding=forwarding, clock=clock)
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        await asyncio.Event().wait()
    finally:
        await server.close()

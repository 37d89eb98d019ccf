"""WireGuard over TLS/TCP to a relay, for networks that block UDP: the agent's end.

A :class:`TcpLink` is one TLS connection to a relay's ``tcp_listen`` address
(verified like the gateway: the system's CA store plus the agent's ``ca_file``,
and the relay's host name) and one local UDP endpoint. The relay bridges the
connection onto its UDP ports (``relay.aio.tcp``), so the admission is the
usual one (see :mod:`agent.paths.relaylink`), carried in
:mod:`relay.streamwire` frames: ``ALLOCATE`` to the control port, ``BIND`` and
``CONFIRM`` to this side's relay port; the relay's return-routability cookie
comes back over the same connection.

Once bound, the peer's WireGuard endpoint is the local UDP endpoint. It is bound
on the address this host uses for the TLS connection (an address the data
plane accepts as an endpoint, unlike loopback), and accepts datagrams only from
WireGuard's own ``address:listen_port`` there: Linux drops datagrams from
outside that carry one of the host's own addresses as their source. Each
datagram WireGuard sends there goes into one frame to the relay port; each
frame from the relay port goes to WireGuard. The connection never blocks
WireGuard: frames wait in a bounded queue, oldest dropped first.

:func:`open_link` retries the connection with a doubling backoff.

:class:`TcpFallback` gives :class:`agent.paths.driver.RelayHooks` their TCP
fallback: ``bind`` tries UDP first (not when this host's netcheck found UDP
blocked and that relay silent to its PING: ``udp_silent``) and, when the relay
does not answer over UDP and the gateway named a TCP address for it, binds over
TLS/TCP instead (the
binding's ``via_tcp`` says so, and its ``control`` is the link's local endpoint,
so that ``probe`` pings over the link); ``udp_back`` PINGs the relay's UDP
control port every ``udp_retry`` seconds while on TCP (True: leave TCP);
``release`` closes the link when the session ends.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from agent.paths.relaylink import RelayBinding, RelayGrant
from relay.client.bind import (
    build_allocate,
    build_bind,
    build_confirm,
    build_ping,
    parse_allocated,
    parse_bound,
    parse_challenge,
    parse_pong,
)
from relay.client.framed import DrainedUdp, FramedStream
from relay.controlwire import Pong, is_control
from relay.errors import ControlError, RelayRefused
from relay.streamwire import PREAMBLE, Datagram, Frame, Refusal
from wiregate.clock import Clock
from wiregate.errors import Unavailable, WiregateError
from wiregate.logging import get_logger
from wiregate.tls import client_context, tls_refusal

__all__ = ["TcpFallback", "TcpLink", "open_link"]

log = get_logger("agent.paths.tcp")

Addr = tuple[str, int]
_T = TypeVar("_T")


class TcpLink(FramedStream):
    """One TLS connection to a relay carrying one relayed side; see the module docstring."""

    def __init__(self, wg_port: int) -> None:
        super().__init__(preamble=False)
        self.wg_port = wg_port
        self.refused: str | None = None
        self.local: Addr | None = None  # the endpoint WireGuard sends to
        self._wg: Addr | None = None
        self._udp: DrainedUdp | None = None
        self._data_port: int | None = None
        self._waiters: list[tuple[int, Callable[[bytes], Any], asyncio.Future[Any]]] = []

    # -- frames from the relay ------------------------------------------------------------

    def frame_received(self, frame: Frame) -> None:
        if isinstance(frame, Refusal):
            self.refused = frame.reason
            log.warning("relay refused the tcp stream", reason=frame.reason)
            self.close()
            return
        if frame.port == self._data_port and not is_control(frame.data):
            if self._udp is not None and self._wg is not None:
                self._udp.sendto(frame.data, self._wg)
            return
        for port, parse, future in list(self._waiters):
            if port == frame.port and not future.done():
                try:
                    future.set_result(parse(frame.data))
                except RelayRefused as exc:  # the relay refused this very request
                    future.set_exception(exc)
                except ControlError:  # not the awaited answer
                    continue
                return

    def from_wireguard(self, data: bytes, src: Addr) -> None:
        """A datagram WireGuard sent to the peer: into a frame, if it is WireGuard's."""
        if src == self._wg and self._data_port is not None and not is_control(data):
            self.send(Datagram(self._data_port, data))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        why = self.refused or (str(exc) if exc else "closed by the relay")
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(Unavailable(f"relay tcp stream lost: {why}"))
        if self._udp is not None:
            self._udp.close()

    # -- requests -------------------------------------------------------------------------

    async def request(
        self, port: int, data: bytes, parse: Callable[[bytes], _T], wait: float = 5.0
    ) -> _T:
        """Send ``data`` to the relay's ``port``; the first answer from that port that
        ``parse`` accepts (ControlError: not it). Unavailable after ``wait`` seconds."""
        if self.transport is None:
            raise Unavailable(f"relay tcp stream lost: {self.refused or 'closed'}")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        entry = (port, parse, future)
        self._waiters.append(entry)
        try:
            self.send(Datagram(port, data))
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            raise Unavailable(f"relay did not answer over tcp within {wait:g} s") from None
        finally:
            self._waiters.remove(entry)

    async def bind(self, grant: RelayGrant, wait: float = 5.0) -> RelayBinding:
        """Allocate, bind and confirm ``grant`` over the stream; the local endpoint is
        then the peer's WireGuard endpoint. RelayRefused / Unavailable on failure."""
        ticket, control = grant.ticket, grant.control[1]
        port = await self.request(
            control, build_allocate(ticket), lambda d: parse_allocated(d, ticket), wait
        )
        cookie = await self.request(
            port, build_bind(ticket), lambda d: parse_challenge(d, ticket), wait
        )
        confirm = build_confirm(ticket, cookie)
        peer_bound = await self.request(port, confirm, lambda d: parse_bound(d, ticket), wait)
        self._data_port = port
        assert self.local is not None
        endpoint = f"{self.local[0]}:{self.local[1]}"
        return RelayBinding(grant.relay_id, grant.control, endpoint, peer_bound)

    async def ping(self, control_port: int, wait: float = 2.0) -> Pong:
        """PING the relay's control port over the stream (liveness of the whole path)."""
        nonce = os.urandom(16)
        return await self.request(
            control_port, build_ping(nonce), lambda d: parse_pong(d, nonce), wait
        )

    def open_local(self) -> None:
        """Bind the endpoint WireGuard sends to, on this host's address of the connection."""
        assert self.transport is not None
        host = str(self.transport.get_extra_info("sockname")[0])
        self._udp = DrainedUdp.bind(host, self.from_wireguard)
        self.local, self._wg = self._udp.address, (host, self.wg_port)


async def _connect(relay: Addr, wg_port: int, ca_file: Path | None, wait: float) -> TcpLink:
    loop = asyncio.get_running_loop()
    host, port = relay
    try:
        async with asyncio.timeout(wait):
            _, link = await loop.create_connection(
                lambda: TcpLink(wg_port),
                host,
                port,
                ssl=client_context(ca_file),
                server_hostname=host,
                ssl_handshake_timeout=wait,
            )
    except TimeoutError:
        raise Unavailable(f"relay {host}:{port} (tcp) did not answer within {wait:g} s") from None
    except (OSError, ssl.SSLError) as exc:
        why = tls_refusal(f"relay {host}:{port}", exc)
        raise Unavailable(why or f"cannot reach relay {host}:{port} over tcp: {exc}") from exc
    link.send_raw(PREAMBLE)
    try:
        link.open_local()
    except OSError as exc:
        link.close()
        raise Unavailable(f"cannot open the local endpoint of the tcp link: {exc}") from exc
    return link


async def open_link(
    relay: Addr,
    wg_port: int,
    *,
    ca_file: Path | None = None,
    wait: float = 5.0,
    attempts: int = 3,
    backoff: float = 0.5,
) -> TcpLink:
    """A connected :class:`TcpLink` to ``relay`` (host, TCP port) for WireGuard on
    ``wg_port``; tries ``attempts`` times, the delay doubling from ``backoff``."""
    delay = backoff
    for attempt in range(attempts):
        try:
            return await _connect(relay, wg_port, ca_file, wait)
        except Unavailable as exc:
            if attempt + 1 == attempts:
                raise
            log.info("relay tcp connect failed; retrying", error=exc.message, delay=delay)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class TcpFallback:
    """Relay hooks with the TCP fallback; see the module docstring."""

    def __init__(
        self,
        *,
        udp_bind: Callable[[RelayGrant], Awaitable[RelayBinding]],
        udp_probe: Callable[[Addr], Awaitable[None]],
        wg_port: int,
        ca_file: Path | None = None,
        udp_blocked: Callable[[], bool] = lambda: False,
        udp_silent: Callable[[str], bool] = lambda _relay_id: False,
        udp_retry: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._udp_bind, self._udp_probe = udp_bind, udp_probe
        self._wg_port, self._ca_file = wg_port, ca_file
        self._udp_blocked, self._udp_retry, self._clock = udp_blocked, udp_retry, clock
        self._udp_silent = udp_silent  # relay id -> UDP to it known not to work here
        self.links: dict[Addr, tuple[TcpLink, Addr, float]] = {}  # local -> link, control, next

    async def bind(self, grant: RelayGrant) -> RelayBinding:
        """Bind over UDP; over TCP when the relay does not answer over UDP and has a TCP
        address, or at once when UDP to that relay is known not to work here."""
        if grant.tcp is not None and self._udp_silent(grant.relay_id):
            log.info("relay silent over udp here; binding over tcp", relay=grant.relay_id)
        else:
            try:
                return await self._udp_bind(grant)
            except (Unavailable, OSError) as exc:
                if grant.tcp is None:
                    raise
                log.info("relay silent over udp; trying tcp", relay=grant.relay_id, error=str(exc))
        assert grant.tcp is not None
        link = await open_link(grant.tcp, self._wg_port, ca_file=self._ca_file)
        try:
            binding = await link.bind(grant)
        except BaseException:
            link.close()
            raise
        assert link.local is not None
        via = f"TCP {grant.tcp[1]} via relay {grant.relay_id}"
        if not self._udp_blocked():
            via += " (the relay does not answer over UDP)"
        control = binding.control
        self.links[link.local] = (link, control, self._clock() + self._udp_retry)
        return replace(binding, control=link.local, via_tcp=via)

    async def probe(self, control: Addr) -> None:
        """Liveness: over the link for a TCP binding, else a UDP PING of ``control``."""
        entry = self.links.get(control)
        if entry is None:
            await self._udp_probe(control)
            return
        link, relay_control, _ = entry
        if link.transport is None:
            raise Unavailable(f"relay tcp stream lost: {link.refused or 'closed'}")
        await link.ping(relay_control[1])

    async def udp_back(self, binding: RelayBinding) -> bool:
        """Whether the relay answers over UDP again (tried every ``udp_retry`` seconds)."""
        entry = self.links.get(binding.control)
        if entry is None or self._clock() < entry[2]:
            return False
        link, relay_control, _ = entry
        self.links[binding.control] = (link, relay_control, self._clock() + self._udp_retry)
        try:
            await self._udp_probe(relay_control)
        except (OSError, WiregateError):
            return False
        return True

    def release(self, binding: RelayBinding) -> None:
        """The session of ``binding`` ended: close its link, if it has one."""
        entry = self.links.pop(binding.control, None)
        if entry is not None:
            entry[0].close()

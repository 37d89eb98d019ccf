"""Relay liveness over asyncio: PING a relay's control port, time the PONG.

:func:`ping_relay` is what the gateway's relay monitor and ``wiregate
netcheck`` use. Each transmission carries a fresh nonce, so a late answer to an
earlier copy is matched to its own send time (the RTT is never inflated by a
retransmission). Datagrams that are not the answer are ignored; only the
timeout ends the wait.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass

from relay.client.bind import build_ping
from relay.controlwire import NONCE_SIZE, Pong, parse_control
from relay.errors import ControlError, RelayTimeout

__all__ = ["PingResult", "ping_relay"]

_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class PingResult:
    """A relay's answer: round-trip time in seconds and its load figures."""

    rtt: float
    allocations: int
    capacity: int

    @property
    def load(self) -> float:
        """Live allocations over capacity; 1.0 (full) when it has no capacity at all."""
        return self.allocations / self.capacity if self.capacity > 0 else 1.0


class _PingProtocol(asyncio.DatagramProtocol):
    """Remembers when each nonce left; resolves ``answer`` with the first matching PONG."""

    def __init__(self) -> None:
        self.sent: dict[bytes, float] = {}
        self.answer: asyncio.Future[PingResult] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        now = time.monotonic()
        if self.answer.done():
            return
        try:
            msg = parse_control(data)
        except ControlError:
            return  # not ours: keep waiting
        if isinstance(msg, Pong) and msg.nonce in self.sent:
            rtt = now - self.sent[msg.nonce]
            self.answer.set_result(PingResult(rtt, msg.allocations, msg.capacity))

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (port unreachable) are not answers: the timeout decides."""


async def ping_relay(
    control: tuple[str, int],
    timeout: float,  # noqa: ASYNC109 - it also sets the retransmission schedule
) -> PingResult:
    """PING ``control`` (host, port) up to three times within ``timeout`` seconds.

    Raises :class:`~relay.errors.RelayTimeout` when no PONG arrives in time and
    :class:`OSError` when the address cannot be resolved or reached at all.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(*control, type=socket.SOCK_DGRAM)
    family, remote = infos[0][0], (str(infos[0][4][0]), int(infos[0][4][1]))
    transport, proto = await loop.create_datagram_endpoint(
        _PingProtocol, remote_addr=remote, family=family
    )
    try:
        return await _exchange(transport, proto, timeout)
    except TimeoutError:
        raise RelayTimeout(f"no PONG from {control[0]}:{control[1]} within {timeout}s") from None
    finally:
        transport.close()


async def _exchange(
    transport: asyncio.DatagramTransport, proto: _PingProtocol, wait: float
) -> PingResult:
    """Send a fresh PING every ``wait / 3`` seconds until a PONG; TimeoutError after ``wait``."""
    interval = wait / _ATTEMPTS
    async with asyncio.timeout(wait):
        while True:
            nonce = secrets.token_bytes(NONCE_SIZE)
            proto.sent[nonce] = time.monotonic()
            transport.sendto(build_ping(nonce))
            done, _ = await asyncio.wait({proto.answer}, timeout=interval)
            if done:
                return proto.answer.result()

"""Binding at a relay for one peer: the I/O half of a relayed path.

With a :class:`RelayGrant` (the ticket the gateway signed for this side of a
pair, and the relay's control address) :func:`bind_at_relay` does the relay's
admission in three exchanges (see :mod:`relay.client.bind`):

1. ``ALLOCATE`` to the control port from an ordinary UDP socket gives this
   side's relay port;
2. ``BIND`` from the WireGuard listen port (a raw socket, as for STUN, because
   WireGuard owns that port) is answered with a cookie;
3. ``CONFIRM`` with the cookie, from the same port, binds the address the relay
   saw: the NAT mapping WireGuard's own datagrams use.

The result is the endpoint to program for the peer: ``relay_ip:relay_port``.
WireGuard then sends to the relay directly; no proxy sits in the data path.
The control address is resolved to IPv4 (the raw socket is IPv4 only).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.discovery.rawudp import raw_request
from relay.client.bind import (
    build_allocate,
    build_bind,
    build_confirm,
    parse_allocated,
    parse_bound,
    parse_challenge,
)
from relay.errors import ControlError
from wiregate.clock import Clock
from wiregate.errors import Unavailable

__all__ = ["RelayBinding", "RelayGrant", "bind_at_relay", "resolve_ipv4", "udp_request"]

Addr = tuple[str, int]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """A ticket for one side of a pair and the relay it is for."""

    relay_id: str
    control: Addr  # host (name or literal) and control port
    ticket: bytes
    tcp: Addr | None = None  # the relay's TLS/TCP address (agent.paths.tcplink), if it has one

    def __repr__(self) -> str:  # tickets are bearer credentials: never in logs
        return f"RelayGrant(relay_id={self.relay_id!r}, control={self.control!r})"


@dataclass(frozen=True, slots=True)
class RelayBinding:
    """This side is bound at ``relay_id``: WireGuard sends to ``endpoint``."""

    relay_id: str
    control: Addr  # resolved IPv4 control address (for liveness probes)
    endpoint: str
    peer_bound: bool
    via_tcp: str = ""  # carried over TLS/TCP (agent.paths.tcplink): how to say so; "": UDP


async def bind_at_relay(grant: RelayGrant, listen_port: int, wait: float = 2.0) -> RelayBinding:
    """Allocate, bind and confirm ``grant`` from ``listen_port``.

    Raises :class:`~relay.errors.RelayRefused` when the relay refuses the ticket,
    :class:`~wiregate.errors.Unavailable` when it does not answer within ``wait``
    seconds per exchange, ``OSError`` for local socket failures."""
    control = await resolve_ipv4(grant.control)
    ticket = grant.ticket
    port = await udp_request(
        control, build_allocate(ticket), _ours(lambda d: parse_allocated(d, ticket)), wait
    )
    relay_port = (control[0], port)
    cookie = await _raw(relay_port, listen_port, build_bind(ticket), parse_challenge, ticket, wait)
    confirm = build_confirm(ticket, cookie)
    peer_bound = await _raw(relay_port, listen_port, confirm, parse_bound, ticket, wait)
    return RelayBinding(grant.relay_id, control, f"{control[0]}:{port}", peer_bound)


async def resolve_ipv4(addr: Addr) -> Addr:
    """``addr`` with its host resolved to an IPv4 literal."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(*addr, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise Unavailable(f"cannot resolve {addr[0]}: {exc}") from exc
    return str(infos[0][4][0]), int(infos[0][4][1])


def _ours(parse: Callable[[bytes], _T]) -> Callable[[bytes], _T | None]:
    """``parse``, with anything that is not the awaited answer ignored (None)."""

    def accept(data: bytes) -> _T | None:
        try:
            return parse(data)
        except ControlError:
            return None

    return accept


async def _raw(
    server: Addr,
    listen_port: int,
    request: bytes,
    parse: Callable[[bytes, bytes], _T],
    ticket: bytes,
    wait: float,
) -> _T:
    try:
        answer, _rtt = await raw_request(
            server, listen_port, request, _ours(lambda d: parse(d, ticket)), wait
        )
    except TimeoutError:
        raise Unavailable(f"relay {server[0]}:{server[1]} did not answer within {wait}s") from None
    return answer


async def udp_request(
    server: Addr,
    request: bytes,
    parse: Callable[[bytes], _T | None],
    wait: float = 2.0,
    clock: Clock = time.monotonic,
) -> _T:
    """``request`` to ``server`` from an ephemeral UDP port, retransmitted with a doubling
    timeout until ``parse`` accepts an answer from ``server`` (None: keep waiting).
    Raises :class:`~wiregate.errors.Unavailable` after ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(server)
        deadline, rto = clock() + wait, wait / 4
        while (left := deadline - clock()) > 0:
            await loop.sock_sendall(sock, request)
            try:
                async with asyncio.timeout(min(rto, left)):
                    while True:
                        answer = parse(await loop.sock_recv(sock, 2048))
                        if answer is not None:
                            return answer
            except TimeoutError:
                rto *= 2
            except ConnectionRefusedError:
                await asyncio.sleep(min(rto, max(deadline - clock(), 0)))
    raise Unavailable(f"relay {server[0]}:{server[1]} did not answer within {wait}s")

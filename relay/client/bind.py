"""Agent-side helpers for binding at the relay (sans-IO): build requests, read answers.

The agent's sequence, with the ticket the gateway gave it for one side of a pair:

1. ``build_allocate(ticket)`` to the relay's control port (from any socket);
   ``parse_allocated(reply, ticket)`` gives this side's relay port. Configure
   WireGuard's endpoint for the peer as ``relay_ip:port``.
2. From the WireGuard listen port (raw socket, as for STUN):
   ``build_bind(ticket)`` to ``relay_ip:port``; ``parse_challenge(reply, ticket)``
   gives the cookie.
3. ``build_confirm(ticket, cookie)`` to the same relay port from the same port;
   ``parse_bound(reply, ticket)`` says whether the peer has bound too.

Liveness: ``build_ping(nonce)`` to the control port (16 random bytes, fresh per
probe); ``parse_pong(reply, nonce)`` gives the relay's load figures.
:func:`relay.client.probe.ping_relay` does the exchange over asyncio.

Each ``parse_*`` raises :class:`~relay.errors.RelayRefused` if the relay refused
(its ``reason`` tells the agent whether a fresh ticket would help),
:class:`~relay.errors.ControlError` for anything else that is not the expected
answer to *this* ticket.
"""

from __future__ import annotations

import hmac
from typing import TypeVar

from relay.controlwire import (
    Allocate,
    Allocated,
    Bind,
    Bound,
    Challenge,
    Confirm,
    ControlMessage,
    Ping,
    Pong,
    Refused,
    build_control,
    parse_control,
)
from relay.errors import ControlError, RelayRefused
from relay.tickets import ticket_id_of

__all__ = [
    "build_allocate",
    "build_bind",
    "build_confirm",
    "build_ping",
    "parse_allocated",
    "parse_bound",
    "parse_challenge",
    "parse_pong",
]

_M = TypeVar("_M", Allocated, Challenge, Bound)


def build_allocate(ticket: bytes) -> bytes:
    """The ALLOCATE request for ``ticket`` (to the control port)."""
    return build_control(Allocate(ticket))


def build_bind(ticket: bytes) -> bytes:
    """The BIND request for ``ticket`` (to this side's relay port, from the WireGuard port)."""
    return build_control(Bind(ticket))


def build_confirm(ticket: bytes, cookie: bytes) -> bytes:
    """The CONFIRM echoing ``cookie`` (same relay port, same source port as the BIND)."""
    return build_control(Confirm(cookie, ticket))


def _expect(data: bytes, ticket: bytes, kind: type[_M]) -> _M:
    msg: ControlMessage = parse_control(data)
    if isinstance(msg, Refused) and msg.ticket_id == ticket_id_of(ticket):
        raise RelayRefused(msg.reason)
    if not isinstance(msg, kind) or msg.ticket_id != ticket_id_of(ticket):
        raise ControlError(f"not the {kind.__name__} answer for this ticket")
    return msg


def parse_allocated(data: bytes, ticket: bytes) -> int:
    """This side's relay port from the ALLOCATED answer."""
    return _expect(data, ticket, Allocated).port


def parse_challenge(data: bytes, ticket: bytes) -> bytes:
    """The cookie from the CHALLENGE answer."""
    return _expect(data, ticket, Challenge).cookie


def parse_bound(data: bytes, ticket: bytes) -> bool:
    """Whether the peer is bound too, from the BOUND answer."""
    return _expect(data, ticket, Bound).peer_bound


def build_ping(nonce: bytes) -> bytes:
    """The PING probe carrying ``nonce`` (16 bytes; ControlError otherwise)."""
    return build_control(Ping(nonce))


def parse_pong(data: bytes, nonce: bytes) -> Pong:
    """The PONG answering the PING with ``nonce``; ControlError for anything else."""
    msg = parse_control(data)
    if not isinstance(msg, Pong) or not hmac.compare_digest(msg.nonce, nonce):
        raise ControlError("not the PONG answer to this nonce")
    return msg

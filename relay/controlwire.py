"""Relay control messages: the bind handshake's wire codec and its cookie (sans-IO).

Every control datagram starts with :data:`MAGIC` (``b"WGRL"``) and a version
byte, so it can be told apart from WireGuard (first byte 1..4, then three zero
bytes; ``W`` is 0x57) and from STUN (top two bits 00 and the magic cookie at
offset 4; 0x57 has top bits 01). Then a kind byte and the body::

    ALLOCATE   ticket                       agent -> control port
    ALLOCATED  ticket_id 16 | port u16      control port -> agent: this side's relay port
    BIND       ticket                       agent's WireGuard port -> its relay port
    CHALLENGE  ticket_id 16 | cookie 16     relay port -> the BIND's source
    CONFIRM    cookie 16 | ticket           agent's WireGuard port -> its relay port
    BOUND      ticket_id 16 | peer_bound u8 relay port -> the bound address
    REFUSED    ticket_id 16 | reason u8     either -> the request's source
    PING       nonce 16 | padding 8         anyone -> control port (liveness, load)
    PONG       nonce 16 | allocations u32 | capacity u32
                                            control port -> the PING's source

PING carries eight bytes of padding (zeros when built, ignored when read) so
that its PONG, with the relay's load figures, is never larger than it: the
relay stays no amplifier for unauthenticated senders.

The cookie is HMAC-SHA256, truncated to 16 bytes, keyed with the relay's
secret, over the source address and port, the relay port, the ticket id and
the time window: only a sender that receives at its source address can echo it
(return routability), and the relay keeps no state until it does.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from relay.errors import ControlError
from relay.tickets import MAX_TICKET_SIZE

__all__ = [
    "MAGIC",
    "NONCE_SIZE",
    "REASONS",
    "Allocate",
    "Allocated",
    "Bind",
    "Bound",
    "Challenge",
    "Confirm",
    "ControlMessage",
    "Kind",
    "Ping",
    "Pong",
    "Refused",
    "build_control",
    "is_control",
    "make_cookie",
    "parse_control",
]

MAGIC = b"WGRL"
VERSION = 1
COOKIE_SIZE = 16
NONCE_SIZE = 16
_ID = 16
_PING_PADDING = 8
_LOAD = struct.Struct("!II")
_HEADER = len(MAGIC) + 2

#: Refusal reasons on the wire, by code; the index is the code.
REASONS = (
    "unknown",
    "ticket_malformed",
    "ticket_unknown_signer",
    "ticket_bad_signature",
    "ticket_wrong_relay",
    "ticket_wrong_tenant",
    "ticket_expired",
    "ticket_not_yet_valid",
    "ticket_replayed",
    "no_verify_keys",
    "bad_cookie",
    "wrong_port",
    "device_quota",
    "relay_full",
    "replay_cache_full",
    "ticket_revoked",
)


class Kind(IntEnum):
    """The control message kinds."""

    ALLOCATE = 1
    ALLOCATED = 2
    BIND = 3
    CHALLENGE = 4
    CONFIRM = 5
    BOUND = 6
    REFUSED = 7
    PING = 8
    PONG = 9


@dataclass(frozen=True, slots=True)
class Allocate:
    """Ask the control port for this side's relay port."""

    ticket: bytes


@dataclass(frozen=True, slots=True)
class Allocated:
    """The relay port of the ticket's side."""

    ticket_id: bytes
    port: int


@dataclass(frozen=True, slots=True)
class Bind:
    """Ask to bind the sender's address to the relay port it was sent to."""

    ticket: bytes


@dataclass(frozen=True, slots=True)
class Challenge:
    """The cookie the sender must echo from the same address."""

    ticket_id: bytes
    cookie: bytes


@dataclass(frozen=True, slots=True)
class Confirm:
    """The echoed cookie, with the ticket again (the relay kept no state)."""

    cookie: bytes
    ticket: bytes


@dataclass(frozen=True, slots=True)
class Bound:
    """The address is bound; ``peer_bound`` says whether the other side is too."""

    ticket_id: bytes
    peer_bound: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """A request refused, and why (one of :data:`REASONS`)."""

    ticket_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    """A liveness probe of the control port; ``nonce`` is echoed in the :class:`Pong`."""

    nonce: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a :class:`Ping`: its nonce and the relay's load (live, at most)."""

    nonce: bytes
    allocations: int
    capacity: int


ControlMessage = Allocate | Allocated | Bind | Challenge | Confirm | Bound | Refused | Ping | Pong


def is_control(data: bytes) -> bool:
    """Whether ``data`` claims to be a relay control message (magic prefix)."""
    return data[: len(MAGIC)] == MAGIC


def _ticket(body: bytes) -> bytes:
    if not 1 <= len(body) <= MAX_TICKET_SIZE:
        raise ControlError("ticket missing or too large")
    return body


def _exact(body: bytes, size: int) -> bytes:
    if len(body) != size:
        raise ControlError(f"control body of {len(body)} bytes, expected {size}")
    return body


def _nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ControlError(f"a ping nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    return nonce


def _parse_body(kind: Kind, body: bytes) -> ControlMessage:
    if kind is Kind.PING:
        return Ping(_exact(body, NONCE_SIZE + _PING_PADDING)[:NONCE_SIZE])
    if kind is Kind.PONG:
        fixed = _exact(body, NONCE_SIZE + _LOAD.size)
        allocations, capacity = _LOAD.unpack(fixed[NONCE_SIZE:])
        return Pong(fixed[:NONCE_SIZE], allocations, capacity)
    if kind is Kind.ALLOCATE:
        return Allocate(_ticket(body))
    if kind is Kind.BIND:
        return Bind(_ticket(body))
    if kind is Kind.CONFIRM:
        return Confirm(body[:COOKIE_SIZE], _ticket(body[COOKIE_SIZE:]))
    if kind is Kind.CHALLENGE:
        fixed = _exact(body, _ID + COOKIE_SIZE)
        return Challenge(fixed[:_ID], fixed[_ID:])
    fixed = _exact(body, _ID + (2 if kind is Kind.ALLOCATED else 1))
    if kind is Kind.ALLOCATED:
        return Allocated(fixed[:_ID], struct.unpack("!H", fixed[_ID:])[0])
    if kind is Kind.BOUND:
        return Bound(fixed[:_ID], fixed[_ID] == 1)
    code = fixed[_ID]
    return Refused(fixed[:_ID], REASONS[code] if code < len(REASONS) else "unknown")


def parse_control(data: bytes) -> ControlMessage:
    """Decode one control datagram or raise :class:`~relay.errors.ControlError`."""
    if len(data) < _HEADER or not is_control(data) or data[4] != VERSION:
        raise ControlError("not a relay control message of version 1")
    try:
        kind = Kind(data[5])
    except ValueError as exc:
        raise ControlError(f"unknown control kind {data[5]}") from exc
    return _parse_body(kind, data[_HEADER:])


def _encode(msg: ControlMessage) -> tuple[Kind, bytes]:
    if isinstance(msg, Ping):
        return Kind.PING, _nonce(msg.nonce) + bytes(_PING_PADDING)
    if isinstance(msg, Pong):
        return Kind.PONG, _nonce(msg.nonce) + _LOAD.pack(msg.allocations, msg.capacity)
    if isinstance(msg, Allocate):
        return Kind.ALLOCATE, msg.ticket
    if isinstance(msg, Bind):
        return Kind.BIND, msg.ticket
    if isinstance(msg, Confirm):
        return Kind.CONFIRM, msg.cookie + msg.ticket
    if isinstance(msg, Challenge):
        return Kind.CHALLENGE, msg.ticket_id + msg.cookie
    if isinstance(msg, Allocated):
        return Kind.ALLOCATED, msg.ticket_id + struct.pack("!H", msg.port)
    if isinstance(msg, Bound):
        return Kind.BOUND, msg.ticket_id + bytes([msg.peer_bound])
    code = REASONS.index(msg.reason) if msg.reason in REASONS else 0
    return Kind.REFUSED, msg.ticket_id + bytes([code])


def build_control(msg: ControlMessage) -> bytes:
    """Encode one control message."""
    kind, body = _encode(msg)
    return MAGIC + bytes([VERSION, kind]) + body


def make_cookie(
    secret: bytes,
    window: int,
    ip: IPv4Address | IPv6Address,
    port: int,
    relay_port: int,
    ticket_id: bytes,
) -> bytes:
    """The return-routability cookie for ``(ip, port)`` binding ``relay_port`` in ``window``."""
    data = b"wgrl-cookie" + struct.pack("!QHH", window, port, relay_port) + ip.packed + ticket_id
    return hmac.new(secret, data, hashlib.sha256).digest()[:COOKIE_SIZE]

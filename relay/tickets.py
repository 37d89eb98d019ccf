"""Relay tickets: what the gateway signs to let one side of a pair bind at a relay (sans-IO).

A ticket names the relay, the tenant, the two nodes of the pair (device id and
WireGuard public key each), which of the two sides it admits, and a short
validity window. The gateway signs it with Ed25519; the relay checks it against
the signers it trusts, each trusted for a set of tenants.

Wire format (version 1, big-endian, at most :data:`MAX_TICKET_SIZE` bytes)::

    version u8 = 1 | side u8 (0 = node_a, 1 = node_b) | ticket_id 16 bytes
    issued_at u64 | expires_at u64 (unix seconds) | signer_id 8 bytes
    relay_id str8 | tenant str8 | key_a 32 bytes | device_a str8 | key_b 32 bytes | device_b str8
    signature 64 bytes: Ed25519 over DOMAIN + everything above

``str8`` is a length byte (1..64) and that many bytes of UTF-8. ``signer_id`` is
the first 8 bytes of SHA-256 of the signer's verify key. Checks run in this
order: trust store present (fail closed), framing, signer, signature, then the
signed claims (relay, tenant, time) - unsigned content is never interpreted
beyond what is needed to find the signature.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from relay.errors import (
    BadTicketSignature,
    ExpiredTicket,
    MalformedTicket,
    NoTrustedSigners,
    TicketNotYetValid,
    UnknownSigner,
    WrongRelay,
    WrongTenant,
)
from wiregate.errors import BadKey
from wiregate.keys import decode_key, parse_public_key

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "MAX_TICKET_SIZE",
    "Node",
    "PairKey",
    "Side",
    "Ticket",
    "TrustedSigner",
    "issue_pair",
    "parse_ticket",
    "sign_ticket",
    "signer_id",
    "ticket_id_of",
]

DOMAIN = b"wiregate relay ticket v1\x00"
VERSION = 1
DEFAULT_LIFETIME = 120
MAX_LIFETIME = 300
MAX_TEXT = 64
_HEAD = struct.Struct("!BB16sQQ8s")
_SIG = 64
MAX_TICKET_SIZE = _HEAD.size + 4 * (1 + MAX_TEXT) + 2 * 32 + _SIG


class Side(IntEnum):
    """Which node of the pair a ticket admits."""

    A = 0
    B = 1


@dataclass(frozen=True, slots=True, order=True)
class Node:
    """One node of a pair: its device id and WireGuard public key (base64)."""

    device_id: str
    public_key: str


@dataclass(frozen=True, slots=True)
class PairKey:
    """A relayed pair, independent of the order the gateway named the nodes in."""

    tenant: str
    first: Node
    second: Node


@dataclass(frozen=True, slots=True)
class Ticket:
    """A relay ticket's signed claims."""

    ticket_id: bytes
    relay_id: str
    tenant: str
    node_a: Node
    node_b: Node
    side: Side
    issued_at: int
    expires_at: int

    @property
    def own(self) -> Node:
        """The node this ticket admits."""
        return self.node_a if self.side is Side.A else self.node_b

    @property
    def peer(self) -> Node:
        """The other node of the pair."""
        return self.node_b if self.side is Side.A else self.node_a

    @property
    def pair(self) -> PairKey:
        """The pair, nodes sorted, so both sides' tickets name the same allocation."""
        first, second = sorted((self.node_a, self.node_b))
        return PairKey(self.tenant, first, second)

    @property
    def pair_index(self) -> int:
        """0 if the admitted node is ``pair.first``, else 1."""
        return 0 if self.own == self.pair.first else 1


@dataclass(frozen=True, slots=True)
class TrustedSigner:
    """A gateway signing key the relay trusts, and the tenants it may sign for."""

    verify_key: bytes
    tenants: frozenset[str]

    @property
    def key_id(self) -> bytes:
        """The 8-byte id tickets carry to name this signer."""
        return signer_id(self.verify_key)


def signer_id(verify_key: bytes) -> bytes:
    """First 8 bytes of SHA-256 of a 32-byte Ed25519 verify key."""
    return hashlib.sha256(verify_key).digest()[:8]


def _str8(text: str) -> bytes:
    raw = text.encode()
    if not 1 <= len(raw) <= MAX_TEXT:
        raise ValueError(f"{text!r}: ticket text fields are 1..{MAX_TEXT} bytes of UTF-8")
    return bytes([len(raw)]) + raw


def _body(ticket: Ticket, key_id: bytes) -> bytes:
    if len(ticket.ticket_id) != 16:
        raise ValueError("a ticket id is 16 bytes")
    head = _HEAD.pack(
        VERSION, ticket.side, ticket.ticket_id, ticket.issued_at, ticket.expires_at, key_id
    )
    parts = [_str8(ticket.relay_id), _str8(ticket.tenant)]
    for node in (ticket.node_a, ticket.node_b):
        try:
            raw = decode_key(parse_public_key(node.public_key))
        except BadKey as exc:
            raise ValueError(f"{node.device_id}: {exc.message}") from exc
        parts += [raw, _str8(node.device_id)]
    return head + b"".join(parts)


def sign_ticket(ticket: Ticket, signing_key: Any) -> bytes:
    """Encode and sign ``ticket`` with a :class:`nacl.signing.SigningKey`.

    Raises ValueError for a field the format cannot carry (bad key, empty or long text).
    """
    key: SigningKey = signing_key
    body = _body(ticket, signer_id(bytes(key.verify_key)))
    return body + bytes(key.sign(DOMAIN + body).signature)


def issue_pair(
    signing_key: Any,
    *,
    relay_id: str,
    tenant: str,
    node_a: Node,
    node_b: Node,
    now: float,
    lifetime: int = DEFAULT_LIFETIME,
) -> tuple[bytes, bytes]:
    """The gateway's side: signed tickets for both nodes of a pair, ``(for_a, for_b)``."""
    ticket_a = Ticket(
        secrets.token_bytes(16), relay_id, tenant, node_a, node_b, Side.A, int(now), 0
    )
    ticket_a = replace(ticket_a, expires_at=ticket_a.issued_at + lifetime)
    ticket_b = replace(ticket_a, ticket_id=secrets.token_bytes(16), side=Side.B)
    return sign_ticket(ticket_a, signing_key), sign_ticket(ticket_b, signing_key)


class _Reader:
    """Bounds-checked reads over the ticket body; any overrun is a MalformedTicket."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._data, self._at = data, offset

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise MalformedTicket("ticket truncated")
        chunk, self._at = self._data[self._at : self._at + n], self._at + n
        return chunk

    def text(self) -> str:
        n = self.take(1)[0]
        if not 1 <= n <= MAX_TEXT:
            raise MalformedTicket("ticket text field of bad length")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError as exc:
            raise MalformedTicket("ticket text field is not UTF-8") from exc

    def node(self) -> Node:
        raw = self.take(32)
        device = self.text()
        try:
            return Node(device, parse_public_key(base64.b64encode(raw).decode()))
        except BadKey as exc:
            raise MalformedTicket(f"ticket names a bad WireGuard key: {exc.message}") from exc

    def done(self) -> bool:
        return self._at == len(self._data)


def ticket_id_of(data: bytes) -> bytes:
    """The ticket id of an encoded ticket, unverified (for the agent to match replies)."""
    if len(data) < _HEAD.size or data[0] != VERSION:
        raise MalformedTicket("not a version 1 ticket")
    return data[2:18]


def _split(data: bytes, verify_keys: Sequence[TrustedSigner]) -> tuple[bytes, TrustedSigner]:
    """The signed body and its signer, after checking size, version and signature."""
    if not verify_keys:
        raise NoTrustedSigners("no relay verify key is loaded; refusing every ticket")
    if not _HEAD.size + _SIG <= len(data) <= MAX_TICKET_SIZE or data[0] != VERSION:
        raise MalformedTicket("not a version 1 ticket of a possible size")
    body, signature = data[:-_SIG], data[-_SIG:]
    key_id = body[_HEAD.size - 8 : _HEAD.size]
    signer = next((s for s in verify_keys if s.key_id == key_id), None)
    if signer is None:
        raise UnknownSigner("ticket signed by a key this relay does not trust")
    try:
        VerifyKey(signer.verify_key).verify(DOMAIN + body, signature)
    except BadSignatureError as exc:
        raise BadTicketSignature("ticket signature does not verify") from exc
    return body, signer


def _decode(body: bytes) -> Ticket:
    _, side, ticket_id, issued, expires, _ = _HEAD.unpack_from(body)
    if side not in (0, 1):
        raise MalformedTicket("ticket side is neither 0 nor 1")
    reader = _Reader(body, _HEAD.size)
    relay_id, tenant = reader.text(), reader.text()
    node_a, node_b = reader.node(), reader.node()
    if not reader.done():
        raise MalformedTicket("trailing bytes after the ticket")
    if node_a.public_key == node_b.public_key or node_a.device_id == node_b.device_id:
        raise MalformedTicket("a ticket's two nodes must differ")
    return Ticket(ticket_id, relay_id, tenant, node_a, node_b, Side(side), issued, expires)


def _check_claims(
    ticket: Ticket, signer: TrustedSigner, now: float, relay_id: str, skew: float
) -> None:
    if ticket.relay_id != relay_id:
        raise WrongRelay(f"ticket is for relay {ticket.relay_id!r}")
    if ticket.tenant not in signer.tenants:
        raise WrongTenant(f"signer is not trusted for tenant {ticket.tenant!r}")
    if not 0 < ticket.expires_at - ticket.issued_at <= MAX_LIFETIME:
        raise MalformedTicket(f"ticket lifetime must be 1..{MAX_LIFETIME} s")
    if ticket.issued_at > now + skew:
        raise TicketNotYetValid("ticket issued in the future; check the clocks")
    if now >= ticket.expires_at + skew:
        raise ExpiredTicket("ticket expired; ask the gateway for a new one")


def parse_ticket(
    data: bytes,
    verify_keys: Sequence[TrustedSigner],
    now: float,
    *,
    relay_id: str,
    skew: float = 5.0,
) -> Ticket:
    """Verify and decode a ticket for this relay at unix time ``now``.

    Raises :class:`~relay.errors.NoTrustedSigners` when ``verify_keys`` is empty
    (fail closed), else a :class:`~relay.errors.TicketError` subclass.
    """
    body, signer = _split(data, verify_keys)
    ticket = _decode(body)
    _check_claims(ticket, signer, now, relay_id, skew)
    return ticket

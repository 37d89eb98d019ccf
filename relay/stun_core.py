"""Sans-IO STUN Binding server: bytes and ``now`` in, the reply's bytes (or None) out.

What it answers, and what it does not:

* Binding requests get a success response with XOR-MAPPED-ADDRESS and
  FINGERPRINT, plus SOFTWARE and, when the server has another address of the
  same family, RFC 5780 RESPONSE-ORIGIN and OTHER-ADDRESS. A client compares the
  mapped address it sees through the two addresses to classify its NAT's
  mapping behaviour (endpoint-independent or not), which is what wiregate needs
  to choose between hole punching and the relay.
* CHANGE-REQUEST with a flag set is declined with 420 (UNKNOWN-ATTRIBUTES 0x0003):
  answering it would mean sending from a socket the client never contacted,
  which ``handle`` (one reply, same socket) cannot express and which only serves
  filtering-behaviour tests; WireGuard's own handshakes open the pinholes anyway.
  A CHANGE-REQUEST with no flag set is a no-op and is answered normally.
* Other unknown comprehension-required attributes (0x0000-0x7FFF) get 420 with
  UNKNOWN-ATTRIBUTES.
* Responses, indications, other methods and anything the codec refuses are
  dropped without a word; ``observe`` is told why (a metric label).
* Never amplifies beyond the smallest complete answer: a reply is never larger
  than ``max(request, smallest_reply(family))``, where the smallest complete
  reply is the header, XOR-MAPPED-ADDRESS and FINGERPRINT for the requester's
  address family (40 bytes for IPv4, 52 for IPv6). Any RFC 8489 client's plain
  20-byte request (or 28 bytes with FINGERPRINT) is therefore answered.
  Optional attributes are shed in the order SOFTWARE, OTHER-ADDRESS,
  RESPONSE-ORIGIN (error responses: the reason phrase, FINGERPRINT); if the
  barest reply is still larger, nothing is sent.
* A token bucket per source address (IPv6: per /64) and one for the whole
  server cap the reply rate, so the server cannot be used to flood anyone.

The hot path is lookups: the sender's address is parsed once and memoised, the
two canonical request shapes (20 bytes; 28 with FINGERPRINT) are recognised by
comparing bytes, and the reply is a precomputed template per listener and
family with the transaction id, the XOR'd address and the CRC filled in. Every
other datagram goes through the full codec (:mod:`relay.stun`).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from zlib import crc32

from relay.errors import StunError
from relay.filters import normalize_ip
from relay.stun import (
    BINDING,
    HEADER_SIZE,
    MAGIC_COOKIE,
    Attribute,
    AttrType,
    ChangeRequest,
    ErrorCode,
    IPAddress,
    Message,
    MessageClass,
    OtherAddress,
    RawAttribute,
    ResponseOrigin,
    Software,
    UnknownAttributes,
    build_message,
    parse_message,
)

__all__ = [
    "GLOBAL_BURST",
    "GLOBAL_RATE",
    "OUTCOMES",
    "SOURCE_BURST",
    "SOURCE_RATE",
    "Addr",
    "RateLimiter",
    "StunServer",
    "TokenBucket",
    "default_limiter",
    "smallest_reply",
]

Addr = tuple[str, int]
Observe = Callable[[str, int], None]

#: Every label ``StunServer`` passes to ``observe``: replies, then drop reasons.
OUTCOMES = (
    "success",
    "error_420",
    "rate_limited",
    "not_request",
    "unsupported_method",
    "too_large",
    "not_stun",
    "malformed",
    "bad_header",
    "bad_attribute",
    "bad_fingerprint",
    "misplaced_attribute",
    "duplicate_attribute",
)

#: STUN's default limits (docs/operations.md explains them). Per source (IPv4
#: address, IPv6 /64): one agent's netcheck sends at most 3 requests to each of at
#: most 3 server addresses (unanswered, retransmitted), so a burst of 1000 and
#: 200/s serve hundreds of agents behind one NAT address and cap what one victim
#: of spoofed requests can receive at 200 small replies a second. Global: about
#: half of what one relay process answers on two cores (``python -m benchmarks.stun``),
#: so that STUN leaves the rest of the event loop to the WireGuard relay.
SOURCE_RATE = 200.0
SOURCE_BURST = 1000.0
GLOBAL_RATE = 30000.0
GLOBAL_BURST = 60000.0

# Known comprehension-required attributes that a server without authentication
# may ignore (RFC 8489 section 9: authentication of Binding is optional).
_IGNORED_REQUIRED = frozenset(
    {
        AttrType.REALM,
        AttrType.NONCE,
        AttrType.MESSAGE_INTEGRITY_SHA256,
        AttrType.PASSWORD_ALGORITHM,
        AttrType.USERHASH,
    }
)

_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_TLV = b"\x80\x28\x00\x04"
_PLAIN_REQUEST = b"\x00\x01\x00\x00" + _COOKIE  # Binding request, no attribute
_FP_REQUEST = b"\x00\x01\x00\x08" + _COOKIE  # Binding request, FINGERPRINT only
_XMA_V4 = b"\x00\x20\x00\x08\x00\x01"  # XOR-MAPPED-ADDRESS TLV header, family 1
_XMA_V6 = b"\x00\x20\x00\x14\x00\x02"
_PORT_XOR = MAGIC_COOKIE >> 16
_SMALLEST = {4: HEADER_SIZE + 12 + 8, 6: HEADER_SIZE + 24 + 8}
_MAX_PEERS = 65536  # senders remembered before the memo starts over
_CRC = struct.Struct("!I").pack


def smallest_reply(family: int) -> int:
    """The smallest complete reply (header, XOR-MAPPED-ADDRESS, FINGERPRINT) for an
    IPv4 (``4``) or IPv6 (``6``) requester: the least any request may be answered with."""
    return _SMALLEST[family]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; one token per datagram."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; time never runs backwards here."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class RateLimiter:
    """A token bucket per source (IPv4 address, IPv6 /64) plus one shared by all.

    At most ``max_sources`` buckets are kept; the least recently seen source is
    forgotten first (it comes back with a full bucket, which is bounded by
    ``burst`` and by the global bucket).
    """

    def __init__(
        self,
        rate: float = 20.0,
        burst: float = 50.0,
        *,
        global_rate: float = 5000.0,
        global_burst: float = 10000.0,
        max_sources: int = 65536,
    ) -> None:
        self._rate, self._burst, self._max = rate, burst, max_sources
        self._global = TokenBucket(global_rate, global_burst, global_burst, 0.0)
        self._buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def allow(self, source: IPAddress, now: float) -> bool:
        """Spend a token of ``source``'s bucket and of the global one."""
        return self.admit([_limit_key(source.packed)], now)[0]

    def allow_key(self, key: bytes, now: float) -> bool:
        """:meth:`allow` for a precomputed key (the packed IPv4 address or IPv6 /64)."""
        return self.admit([key], now)[0]

    def admit(self, keys: Sequence[bytes], now: float) -> list[bool]:
        """:meth:`allow_key` for each key in turn (one datagram each), in one call.

        A source's token is spent before the global bucket is asked, as one at a time."""
        shared, buckets, rate, burst = self._global, self._buckets, self._rate, self._burst
        spare = -1  # the global bucket's whole tokens, once a source has passed
        granted: list[bool] = []
        for key in keys:
            bucket = buckets.get(key)
            if bucket is None:
                bucket = TokenBucket(rate, burst, burst, now)
                if len(buckets) >= self._max:
                    buckets.popitem(last=False)
                buckets[key] = bucket
            else:
                buckets.move_to_end(key)
                if now > bucket.stamp:
                    bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
                    bucket.stamp = now
            if bucket.tokens < 1.0:
                granted.append(False)
                continue
            bucket.tokens -= 1.0  # spent even when the global bucket then refuses
            if spare < 0:
                shared.take(now, 0.0)  # refill only
                spare = int(shared.tokens)
            granted.append(spare > 0)
            spare -= spare > 0
        if spare >= 0:
            shared.tokens -= int(shared.tokens) - spare
        return granted

    def __len__(self) -> int:
        return len(self._buckets)


def _limit_key(packed: bytes) -> bytes:
    return packed if len(packed) == 4 else packed[:8]


@dataclass(frozen=True, slots=True)
class _Peer:
    """What the hot path needs of a sender's ``(host, port)``, worked out once."""

    key: bytes  # rate-limit key: the IPv4 address, the IPv6 /64
    family: int  # 4 or 6
    port: int
    address: bytes  # IPv4: the whole XOR-MAPPED-ADDRESS TLV; IPv6: the packed address


def _peer(src: Addr) -> _Peer | None:
    try:
        packed = normalize_ip(src[0]).packed
    except ValueError:
        return None
    xport = (src[1] ^ _PORT_XOR).to_bytes(2, "big")
    if len(packed) == 4:
        xip = bytes(a ^ b for a, b in zip(packed, _COOKIE, strict=True))
        return _Peer(packed, 4, src[1], _XMA_V4 + xport + xip)
    return _Peer(packed[:8], 6, src[1], packed)


class _Listener:
    """Success-reply templates of one listener: for each family, the variant to send
    for each budget (the fullest that fits)."""

    __slots__ = ("_pick", "head4")

    def __init__(self, extras: Sequence[Attribute]) -> None:
        encoded = [
            build_message(BINDING, MessageClass.SUCCESS, bytes(12), [a])[20:] for a in extras
        ]
        self._pick: dict[int, list[tuple[bytes, bytes]]] = {}
        #: the smallest IPv4 reply's header (the answer to a canonical request)
        self.head4 = b"\x01\x01" + (12 + 8).to_bytes(2, "big") + _COOKIE
        for family, xma in ((4, 12), (6, 24)):
            variants = []
            for n in range(len(encoded), -1, -1):
                body = b"".join(encoded[:n])
                size = HEADER_SIZE + xma + len(body) + 8
                head = b"\x01\x01" + (size - HEADER_SIZE).to_bytes(2, "big") + _COOKIE
                variants.append((size, head, body))
            smallest = variants[-1][0]  # == smallest_reply(family): always allowed
            self._pick[family] = [
                next((h, b) for s, h, b in variants if s <= max(budget, smallest))
                for budget in range(variants[0][0] + 1)
            ]

    def success(self, peer: _Peer, txid: bytes, size: int) -> bytes:
        """The fullest success reply within ``max(size, smallest_reply(family))``."""
        pick = self._pick[peer.family]
        head, extras = pick[size if size < len(pick) else -1]
        body = head + txid + _xor_mapped(peer, txid) + extras
        return body + _FINGERPRINT_TLV + _CRC(crc32(body) ^ _FINGERPRINT_XOR)


def _xor_mapped(peer: _Peer, txid: bytes) -> bytes:
    if peer.family == 4:
        return peer.address
    key = int.from_bytes(_COOKIE + txid, "big")
    xip = (int.from_bytes(peer.address, "big") ^ key).to_bytes(16, "big")
    return _XMA_V6 + (peer.port ^ _PORT_XOR).to_bytes(2, "big") + xip


class StunServer:
    """The STUN Binding server core. ``local_addresses`` are all the listeners.

    ``observe(outcome, count)`` is told what became of the datagrams (labels of
    :data:`OUTCOMES`), once per outcome per call of :meth:`handle_batch`.
    """

    def __init__(
        self,
        local_addresses: Sequence[Addr] = (),
        *,
        software: str | None = "wiregate",
        limiter: RateLimiter | None = None,
        observe: Observe | None = None,
    ) -> None:
        self._software: tuple[Attribute, ...] = (Software(software),) if software else ()
        self._limiter = limiter if limiter is not None else default_limiter()
        self._observe: Observe = observe or (lambda _outcome, _count: None)
        self._rfc5780 = _rfc5780_attributes(local_addresses)
        self._listeners: dict[Addr, _Listener] = {}
        self._peers: dict[Addr, _Peer | None] = {}

    def handle(self, data: bytes, src: Addr, local: Addr, now: float) -> bytes | None:
        """The reply to one datagram from ``src`` received on ``local``, or None."""
        replies = self.handle_batch([(data, src)], local, now)
        return replies[0][0] if replies else None

    def handle_batch(
        self, datagrams: Sequence[tuple[bytes, Addr]], local: Addr, now: float
    ) -> list[tuple[bytes, Addr]]:
        """The replies (bytes, destination) to datagrams received on ``local`` at ``now``."""
        listener = self._listeners.get(local) or self._listener(local)
        peers = self._peers
        known: list[tuple[bytes, Addr, _Peer]] = []
        for data, src in datagrams:
            peer = peers.get(src) or self._remember(src)
            if peer is not None:
                known.append((data, src, peer))
        counts: dict[str, int] = {}
        if len(known) < len(datagrams):
            counts["not_stun"] = len(datagrams) - len(known)
        granted = self._limiter.admit([peer.key for _, _, peer in known], now)
        out: list[tuple[bytes, Addr]] = []
        head4, success, refused = listener.head4, 0, 0
        for (data, src, peer), ok in zip(known, granted, strict=True):
            if not ok:
                refused += 1
            elif (len(data) == HEADER_SIZE and data[:8] == _PLAIN_REQUEST) or _fingerprinted(data):
                # a canonical request: no parsing, the smallest reply from its template
                if peer.family == 4:
                    body = head4 + data[8:20] + peer.address
                    reply = body + _FINGERPRINT_TLV + _CRC(crc32(body) ^ _FINGERPRINT_XOR)
                else:
                    reply = listener.success(peer, data[8:20], len(data))
                out.append((reply, src))
                success += 1
            else:
                answer, outcome = self._full(data, peer, listener)
                counts[outcome] = counts.get(outcome, 0) + 1
                if answer is not None:
                    out.append((answer, src))
        for outcome, count in (("success", success), ("rate_limited", refused)):
            if count:
                counts[outcome] = counts.get(outcome, 0) + count
        for outcome, count in counts.items():
            self._observe(outcome, count)
        return out

    def _remember(self, src: Addr) -> _Peer | None:
        if len(self._peers) >= _MAX_PEERS:
            self._peers.clear()
        peer = self._peers[src] = _peer(src)
        return peer

    def _listener(self, local: Addr) -> _Listener:
        extras = (*self._rfc5780.get(_key(local), ()), *self._software)
        listener = self._listeners[local] = _Listener(extras)
        return listener

    def _full(self, data: bytes, peer: _Peer, listener: _Listener) -> tuple[bytes | None, str]:
        """Any datagram but the canonical requests: through the whole codec."""
        try:
            msg = parse_message(data)
        except StunError as exc:
            return None, exc.reason
        if msg.msg_class is not MessageClass.REQUEST:
            return None, "not_request"
        if msg.method != BINDING:
            return None, "unsupported_method"
        unknown = _unknown_required(msg)
        if unknown:
            budget = max(len(data), smallest_reply(peer.family))
            return _error_420(msg.transaction_id, unknown, budget)
        return listener.success(peer, msg.transaction_id, len(data)), "success"


def default_limiter() -> RateLimiter:
    """A rate limiter with STUN's default per-source and global budgets."""
    return RateLimiter(
        SOURCE_RATE, SOURCE_BURST, global_rate=GLOBAL_RATE, global_burst=GLOBAL_BURST
    )


def _fingerprinted(data: bytes) -> bool:
    """A Binding request of 28 bytes: nothing but a valid FINGERPRINT."""
    return (
        len(data) == HEADER_SIZE + 8
        and data[:8] == _FP_REQUEST
        and data[20:24] == _FINGERPRINT_TLV
        and int.from_bytes(data[24:28], "big") == crc32(data[:20]) ^ _FINGERPRINT_XOR
    )


def _error_420(txid: bytes, unknown: tuple[int, ...], budget: int) -> tuple[bytes | None, str]:
    """The fullest 420 (reason phrase, FINGERPRINT, then neither) within ``budget``."""
    full = (ErrorCode(420, "Unknown Attribute"), UnknownAttributes(unknown))
    bare = (ErrorCode(420), UnknownAttributes(unknown))
    for attrs, fingerprint in ((full, True), (bare, True), (bare, False)):
        reply = build_message(BINDING, MessageClass.ERROR, txid, attrs, fingerprint=fingerprint)
        if len(reply) <= budget:
            return reply, "error_420"
    return None, "too_large"


def _unknown_required(msg: Message) -> tuple[int, ...]:
    unknown = [
        a.type
        for a in msg.attributes
        if isinstance(a, RawAttribute) and a.type < 0x8000 and a.type not in _IGNORED_REQUIRED
    ]
    change = msg.get(ChangeRequest)
    if isinstance(change, ChangeRequest) and (change.change_ip or change.change_port):
        unknown.append(AttrType.CHANGE_REQUEST)
    return tuple(unknown)


def _key(addr: Addr) -> tuple[IPAddress, int] | None:
    try:
        return normalize_ip(addr[0]), addr[1]
    except ValueError:
        return None


def _rfc5780_attributes(
    local_addresses: Sequence[Addr],
) -> dict[tuple[IPAddress, int] | None, tuple[Attribute, ...]]:
    """For each specific listener: RESPONSE-ORIGIN and the OTHER-ADDRESS to advertise."""
    specific = [k for k in map(_key, local_addresses) if k is not None and not k[0].is_unspecified]
    table: dict[tuple[IPAddress, int] | None, tuple[Attribute, ...]] = {}
    for ip, port in specific:
        others = [(o, p) for o, p in specific if o.version == ip.version and (o, p) != (ip, port)]
        # RFC 5780 wants the other address to differ in IP and port; prefer that.
        others.sort(key=lambda other: (other[0] == ip, other[1] == port))
        if others:
            table[(ip, port)] = (ResponseOrigin(ip, port), OtherAddress(*others[0]))
    return table

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
* Never amplifies: a reply is never larger than the request. Optional attributes
  are shed in the order SOFTWARE, OTHER-ADDRESS, RESPONSE-ORIGIN, FINGERPRINT
  (error responses: the reason phrase, FINGERPRINT); if the bare reply is still
  larger, nothing is sent. A bare 20-byte request therefore gets no answer: pad
  requests (``relay.client.stun`` does).
* A token bucket per source address (IPv6: per /64) and one for the whole
  server cap the reply rate, so the server cannot be used to flood anyone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network, ip_address

from relay.errors import StunError
from relay.stun import (
    BINDING,
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
    XorMappedAddress,
    build_message,
    parse_message,
)

__all__ = ["OUTCOMES", "Addr", "RateLimiter", "StunServer", "TokenBucket"]

Addr = tuple[str, int]

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


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; one token per datagram."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        """Spend one token if there is one; time never runs backwards here."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
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
        self._buckets: OrderedDict[IPAddress | IPv6Network, TokenBucket] = OrderedDict()

    def allow(self, source: IPAddress, now: float) -> bool:
        """Spend a token of ``source``'s bucket and of the global one."""
        key = IPv6Network((source, 64), strict=False) if source.version == 6 else source
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, self._burst, now)
            if len(self._buckets) >= self._max:
                self._buckets.popitem(last=False)
        self._buckets[key] = bucket
        return bucket.take(now) and self._global.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


def _ip(host: str) -> IPAddress:
    """The address of a socket tuple's host; v4-mapped IPv6 becomes IPv4."""
    ip = ip_address(host.partition("%")[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class StunServer:
    """The STUN Binding server core. ``local_addresses`` are all the listeners."""

    def __init__(
        self,
        local_addresses: Sequence[Addr] = (),
        *,
        software: str | None = "wiregate",
        limiter: RateLimiter | None = None,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self._software: tuple[Attribute, ...] = (Software(software),) if software else ()
        self._limiter = limiter if limiter is not None else RateLimiter()
        self._observe = observe or (lambda _outcome: None)
        self._rfc5780 = _rfc5780_attributes(local_addresses)

    def handle(self, data: bytes, src: Addr, local: Addr, now: float) -> bytes | None:
        """The reply to one datagram from ``src`` received on ``local``, or None."""
        reply, outcome = self._handle(data, src, local, now)
        self._observe(outcome)
        return reply

    def _handle(self, data: bytes, src: Addr, local: Addr, now: float) -> tuple[bytes | None, str]:
        try:
            source = _ip(src[0])
        except ValueError:
            return None, "not_stun"
        if not self._limiter.allow(source, now):
            return None, "rate_limited"
        try:
            msg = parse_message(data)
        except StunError as exc:
            return None, exc.reason
        return self._answer(msg, len(data), XorMappedAddress(source, src[1]), local)

    def _answer(
        self, msg: Message, budget: int, mapped: XorMappedAddress, local: Addr
    ) -> tuple[bytes | None, str]:
        if msg.msg_class is not MessageClass.REQUEST:
            return None, "not_request"
        if msg.method != BINDING:
            return None, "unsupported_method"
        unknown = _unknown_required(msg)
        if unknown:
            full = (ErrorCode(420, "Unknown Attribute"), UnknownAttributes(unknown))
            bare: tuple[Attribute, ...] = (ErrorCode(420), UnknownAttributes(unknown))
            return _fit(msg, MessageClass.ERROR, [full, bare], budget, "error_420")
        extras = (*self._rfc5780.get(_key(local), ()), *self._software)
        variants = [(mapped, *extras[:n]) for n in range(len(extras), -1, -1)]
        return _fit(msg, MessageClass.SUCCESS, variants, budget, "success")


def _fit(
    msg: Message,
    klass: MessageClass,
    variants: list[tuple[Attribute, ...]],
    budget: int,
    outcome: str,
) -> tuple[bytes | None, str]:
    """The fullest variant (with FINGERPRINT, then the barest without) within ``budget``."""
    tid = msg.transaction_id
    tries = [(attrs, True) for attrs in variants] + [(variants[-1], False)]
    for attrs, fingerprint in tries:
        reply = build_message(BINDING, klass, tid, attrs, fingerprint=fingerprint)
        if len(reply) <= budget:
            return reply, outcome
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
        return _ip(addr[0]), addr[1]
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

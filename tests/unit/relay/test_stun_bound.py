"""The STUN server over generated request shapes: the amplification bound on every reply,
every well-formed Binding request answered, and every case of the security checklist
refused, also next to the canonical 20- and 28-byte shapes the fast path recognises."""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.client.stun import parse_binding_response
from relay.stun import (
    BINDING,
    MAGIC_COOKIE,
    AttrType,
    ChangeRequest,
    MessageClass,
    RawAttribute,
    Software,
    Username,
    XorMappedAddress,
    build_message,
    parse_message,
)
from relay.stun_core import RateLimiter, StunServer, TokenBucket, smallest_reply

V4_LOCALS = [("127.0.0.1", 3478), ("127.0.0.2", 3479)]
V6_LOCALS = [("::1", 3478), ("::2", 3479)]
TXID = bytes(range(12))
UNLIMITED = RateLimiter(1e12, 1e12, global_rate=1e12, global_burst=1e12)

_KNOWN = {int(t) for t in AttrType}
optional_raw = st.builds(
    RawAttribute,
    st.integers(0x8000, 0xFFFF).filter(lambda t: t not in _KNOWN),
    st.binary(max_size=64),
)
required_raw = st.builds(
    RawAttribute,
    st.integers(0x0000, 0x7FFF).filter(lambda t: t not in _KNOWN),
    st.binary(max_size=64),
)
benign = st.one_of(
    optional_raw,
    st.builds(Software, st.text(max_size=40)),
    st.builds(Username, st.text(max_size=40)),
    st.just(ChangeRequest()),
)
sources = st.one_of(
    st.ip_addresses(v=4).map(lambda a: str(a)),
    st.ip_addresses(v=6).map(lambda a: str(a)),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
)


def family(host: str) -> int:
    ip = ip_address(host)
    return 6 if isinstance(ip, IPv6Address) and ip.ipv4_mapped is None else 4


def serve(data: bytes, host: str, port: int) -> bytes | None:
    locals_ = V6_LOCALS if family(host) == 6 else V4_LOCALS
    return StunServer(locals_, limiter=UNLIMITED).handle(data, (host, port), locals_[0], 0.0)


@settings(max_examples=400)
@given(
    st.binary(min_size=12, max_size=12),
    st.lists(benign, max_size=5),
    st.booleans(),
    sources,
    st.integers(1, 65535),
)
def test_every_binding_request_is_answered_within_the_bound(
    txid: bytes, attrs: list[object], fingerprint: bool, host: str, port: int
) -> None:
    unique = list({a.type if isinstance(a, RawAttribute) else type(a): a for a in attrs}.values())
    data = build_message(BINDING, MessageClass.REQUEST, txid, unique, fingerprint=fingerprint)  # type: ignore[arg-type]
    reply = serve(data, host, port)
    assert reply is not None
    assert len(reply) <= max(len(data), smallest_reply(family(host)))
    mapped = parse_binding_response(reply, txid).mapped
    expected = ip_address(host)
    if isinstance(expected, IPv6Address) and expected.ipv4_mapped is not None:
        expected = expected.ipv4_mapped
    assert (ip_address(mapped[0]), mapped[1]) == (expected, port)
    assert parse_message(reply).fingerprint


@settings(max_examples=400)
@given(
    st.integers(0, 0xFFF),
    st.sampled_from(MessageClass),
    st.binary(min_size=12, max_size=12),
    st.lists(st.one_of(benign, required_raw), max_size=5),
    st.one_of(st.none(), st.binary(min_size=1, max_size=16)),
    st.booleans(),
    sources,
)
def test_no_reply_is_ever_larger_than_the_bound(
    method: int,
    klass: MessageClass,
    txid: bytes,
    attrs: list[object],
    key: bytes | None,
    fingerprint: bool,
    host: str,
) -> None:
    unique = list({a.type if isinstance(a, RawAttribute) else type(a): a for a in attrs}.values())
    data = build_message(method, klass, txid, unique, integrity_key=key, fingerprint=fingerprint)  # type: ignore[arg-type]
    reply = serve(data, host, 4242)
    assert reply is None or len(reply) <= max(len(data), smallest_reply(family(host)))
    if reply is not None:
        assert klass is MessageClass.REQUEST and method == BINDING


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=40), sources)
def test_arbitrary_short_datagrams_stay_within_the_bound(data: bytes, host: str) -> None:
    reply = serve(data, host, 4242)
    assert reply is None or len(reply) <= max(len(data), smallest_reply(family(host)))


# --- the security checklist, at the sizes of the fast path ---------------------------


def header(msg_type: int = 0x0001, length: int = 0, cookie: int = MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", msg_type, length, cookie) + TXID


def fingerprinted(head: bytes, crc_xor: int = 0x5354554E) -> bytes:
    return head + struct.pack("!HHI", 0x8028, 4, zlib.crc32(head) ^ crc_xor)


REFUSED = [
    (header()[:19], "not_stun"),  # shorter than 20 bytes
    (header(length=4), "bad_header"),  # length field past the datagram
    (header(length=2) + b"\0\0", "bad_header"),  # length not a multiple of 4
    (header(cookie=0x2112A443), "not_stun"),  # wrong magic cookie
    (header(msg_type=0x4001), "not_stun"),  # a top bit set
    (header(msg_type=0x8001), "not_stun"),
    (header() + bytes(4), "bad_header"),  # trailing bytes
    (fingerprinted(header(length=8)) + bytes(4), "bad_header"),
    (fingerprinted(header(length=8), crc_xor=0), "bad_fingerprint"),  # wrong CRC
    (header(length=8) + struct.pack("!HH", 0x8028, 4) + bytes(4), "bad_fingerprint"),
    (header(length=8) + struct.pack("!HH", 0x8022, 8) + bytes(4), "bad_attribute"),  # overrun
    (header(length=12) + struct.pack("!HHBBH", 0x0020, 8, 0, 3, 0) + bytes(4), "bad_attribute"),
    (header(msg_type=0x0101), "not_request"),  # a success response
    (header(msg_type=0x0111), "not_request"),  # an error response
    (header(msg_type=0x0011), "not_request"),  # an indication
    (fingerprinted(header(msg_type=0x0101, length=8)), "not_request"),
    (header(msg_type=0x0003), "unsupported_method"),  # TURN Allocate
    (fingerprinted(header(msg_type=0x0003, length=8)), "unsupported_method"),
]


@pytest.mark.parametrize(("data", "outcome"), REFUSED)
@pytest.mark.parametrize("host", ["192.0.2.10", "2001:db8::7"])
def test_checklist_cases_get_no_reply(data: bytes, outcome: str, host: str) -> None:
    seen: list[tuple[str, int]] = []
    locals_ = V6_LOCALS if ":" in host else V4_LOCALS
    server = StunServer(locals_, observe=lambda o, n: seen.append((o, n)))
    assert server.handle(data, (host, 40000), locals_[0], 0.0) is None
    assert seen == [(outcome, 1)]


def duplicated() -> bytes:
    once = build_message(BINDING, MessageClass.REQUEST, TXID, [Software("a")])[20:]
    return header(length=2 * len(once)) + once + once


def after_integrity() -> bytes:
    sealed = build_message(BINDING, MessageClass.REQUEST, TXID, [], integrity_key=b"k")[20:]
    body = sealed + struct.pack("!HH", 0x8022, 4) + b"abcd"
    return header(length=len(body)) + body


@pytest.mark.parametrize(
    ("data", "outcome"),
    [(duplicated(), "duplicate_attribute"), (after_integrity(), "misplaced_attribute")],
)
def test_duplicates_and_attributes_after_integrity_are_refused(data: bytes, outcome: str) -> None:
    seen: list[str] = []
    server = StunServer(V4_LOCALS, observe=lambda o, _n: seen.append(o))
    assert server.handle(data, ("192.0.2.1", 1), V4_LOCALS[0], 0.0) is None
    assert seen == [outcome]


def test_unknown_required_attribute_gets_420_within_the_bound() -> None:
    data = build_message(BINDING, MessageClass.REQUEST, TXID, [RawAttribute(0x0024, bytes(4))])
    reply = StunServer(V4_LOCALS).handle(data, ("192.0.2.1", 1), V4_LOCALS[0], 0.0)
    assert reply is not None and len(reply) <= max(len(data), smallest_reply(4))
    assert parse_message(reply).msg_class is MessageClass.ERROR


def test_batch_answers_each_source_in_order() -> None:
    plain = header()
    batch = [(plain, (f"192.0.2.{i}", 1000 + i)) for i in range(1, 6)]
    batch.insert(2, (b"junk", ("192.0.2.99", 9)))
    seen: dict[str, int] = {}
    server = StunServer(V4_LOCALS, observe=lambda o, n: seen.__setitem__(o, n))
    replies = server.handle_batch(batch, V4_LOCALS[0], 0.0)
    assert [dest for _, dest in replies] == [src for data, src in batch if data == plain]
    for reply, (host, port) in replies:
        msg = parse_message(reply)
        assert msg.get(XorMappedAddress) == XorMappedAddress(IPv4Address(host), port)
    assert seen == {"success": 5, "not_stun": 1}


# --- the batched rate limiter against the one-at-a-time model ---------------------------


class ReferenceLimiter:
    """Per-source buckets (LRU, bounded) and a global bucket, one datagram at a time."""

    def __init__(self, rate: float, burst: float, grate: float, gburst: float, most: int) -> None:
        self.rate, self.burst, self.most = rate, burst, most
        self.shared = TokenBucket(grate, gburst, gburst, 0.0)
        self.buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def allow(self, key: bytes, now: float) -> bool:
        bucket = self.buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            if len(self.buckets) >= self.most:
                self.buckets.popitem(last=False)
        self.buckets[key] = bucket
        return bucket.take(now) and self.shared.take(now)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.floats(-1.0, 3.0),
            st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), max_size=12),
        ),
        max_size=12,
    ),
    st.integers(1, 4),
)
def test_admit_in_batches_is_one_at_a_time(
    batches: list[tuple[float, list[bytes]]], most: int
) -> None:
    limiter = RateLimiter(2.0, 3.0, global_rate=4.0, global_burst=6.0, max_sources=most)
    model = ReferenceLimiter(2.0, 3.0, 4.0, 6.0, most)
    now = 0.0
    for step, keys in batches:
        now += step
        assert limiter.admit(keys, now) == [model.allow(k, now) for k in keys]
        assert len(limiter) == len(model.buckets)

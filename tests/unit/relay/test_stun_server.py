"""The sans-IO STUN server: answers, silences, amplification and rate limits (fake clock).

The amplification bound: a reply is never larger than max(request, the smallest
complete reply for the requester's family), checked on every reply size here and
over generated request shapes in ``test_stun_bound.py``."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from relay import errors
from relay.client.stun import REQUEST_SIZE, build_binding_request, parse_binding_response
from relay.stun import (
    BINDING,
    Attribute,
    ChangeRequest,
    ErrorCode,
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
from relay.stun_core import OUTCOMES, RateLimiter, StunServer, TokenBucket, smallest_reply

PRIMARY, SECONDARY = ("127.0.0.1", 3478), ("127.0.0.2", 3479)
CLIENT = ("192.0.2.10", 40000)
TXID = bytes(range(12))


class Recorder:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, outcome: str, count: int) -> None:
        self.counts[outcome] += count


@pytest.fixture
def seen() -> Recorder:
    return Recorder()


@pytest.fixture
def server(seen: Recorder) -> StunServer:
    return StunServer([PRIMARY, SECONDARY], observe=seen)


def request(
    *attrs: object, size: int | None = None, msg_class: MessageClass = MessageClass.REQUEST
) -> bytes:
    """A request with ``attrs``, SOFTWARE-padded to ``size`` bytes if given (with FINGERPRINT)."""
    data = build_message(BINDING, msg_class, TXID, attrs, fingerprint=True)  # type: ignore[arg-type]
    if size is not None and size > len(data):
        pad = Software(" " * (size - len(data) - 4))
        data = build_message(BINDING, msg_class, TXID, (*attrs, pad), fingerprint=True)  # type: ignore[arg-type]
    return data


# --- answers --------------------------------------------------------------------


def test_binding_success_carries_mapped_origin_and_other(
    server: StunServer, seen: Recorder
) -> None:
    txid, data = build_binding_request()
    reply = server.handle(data, CLIENT, PRIMARY, 0.0)
    assert reply is not None and len(reply) <= len(data)
    answer = parse_binding_response(reply, txid)
    assert answer.mapped == CLIENT
    assert answer.response_origin == PRIMARY
    assert answer.other_address == SECONDARY
    msg = parse_message(reply)
    assert msg.fingerprint and msg.get(Software) == Software("wiregate")
    assert seen.counts == {"success": 1}


def test_each_listener_advertises_the_other(server: StunServer) -> None:
    txid, data = build_binding_request()
    answer = parse_binding_response(server.handle(data, CLIENT, SECONDARY, 0.0) or b"", txid)
    assert (answer.response_origin, answer.other_address) == (SECONDARY, PRIMARY)


def test_ipv6_client_fits_a_padded_request(server: StunServer) -> None:
    txid, data = build_binding_request()
    assert len(data) == REQUEST_SIZE
    six = StunServer([("::1", 3478), ("::2", 3479)])
    reply = six.handle(data, ("2001:db8::7", 5555), ("::1", 3478), 0.0)
    assert reply is not None
    answer = parse_binding_response(reply, txid)
    assert answer.mapped == ("2001:db8::7", 5555)
    assert answer.other_address == ("::2", 3479)
    assert parse_message(reply).get(Software) is not None  # nothing shed at 112 bytes


def test_v4_mapped_source_is_reported_as_ipv4(server: StunServer) -> None:
    txid, data = build_binding_request()
    reply = server.handle(data, ("::ffff:192.0.2.10", 40000), PRIMARY, 0.0)
    assert parse_binding_response(reply or b"", txid).mapped == CLIENT


@pytest.mark.parametrize(
    "locals_",
    [[PRIMARY], [("0.0.0.0", 3478), ("0.0.0.0", 3479)], [PRIMARY, ("::1", 3479)]],
)
def test_no_rfc5780_attributes_without_a_usable_second_address(
    locals_: list[tuple[str, int]],
) -> None:
    txid, data = build_binding_request()
    reply = StunServer(locals_).handle(data, CLIENT, locals_[0], 0.0)
    answer = parse_binding_response(reply or b"", txid)
    assert (
        answer.mapped == CLIENT and answer.other_address is None and answer.response_origin is None
    )


def test_other_address_prefers_a_different_ip_and_port() -> None:
    listeners = [("127.0.0.1", 3478), ("127.0.0.1", 3479), ("127.0.0.2", 3478), ("127.0.0.2", 3479)]
    txid, data = build_binding_request()
    reply = StunServer(listeners).handle(data, CLIENT, listeners[0], 0.0)
    assert parse_binding_response(reply or b"", txid).other_address == ("127.0.0.2", 3479)


def test_optional_comprehension_attribute_is_ignored(server: StunServer) -> None:
    data = request(RawAttribute(0x8029, bytes(8)), size=REQUEST_SIZE)
    reply = parse_message(server.handle(data, CLIENT, PRIMARY, 0.0) or b"")
    assert reply.msg_class is MessageClass.SUCCESS


# --- 420 ------------------------------------------------------------------------

SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae80220010"
    "5354554e207465737420636c69656e74002400046e0001ff"
    "80290008932ff9b151263b3600060009657674" + "6a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf"
)


def test_rfc5769_request_gets_420_for_priority(server: StunServer, seen: Recorder) -> None:
    reply = server.handle(SAMPLE_REQUEST, CLIENT, PRIMARY, 0.0)
    assert reply is not None and len(reply) <= len(SAMPLE_REQUEST)
    msg = parse_message(reply)
    assert msg.msg_class is MessageClass.ERROR and msg.transaction_id == SAMPLE_REQUEST[8:20]
    assert msg.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert msg.get(UnknownAttributes) == UnknownAttributes((0x0024,))
    assert seen.counts == {"error_420": 1}


def test_change_request_with_flags_is_declined_with_420(server: StunServer) -> None:
    data = request(ChangeRequest(change_ip=True, change_port=True), size=REQUEST_SIZE)
    msg = parse_message(server.handle(data, CLIENT, PRIMARY, 0.0) or b"")
    assert msg.get(UnknownAttributes) == UnknownAttributes((0x0003,))


def test_change_request_without_flags_is_answered(server: StunServer) -> None:
    data = request(ChangeRequest(), size=REQUEST_SIZE)
    msg = parse_message(server.handle(data, CLIENT, PRIMARY, 0.0) or b"")
    assert msg.msg_class is MessageClass.SUCCESS


def test_small_420_sheds_reason_and_fingerprint() -> None:
    data = build_message(BINDING, MessageClass.REQUEST, TXID, [RawAttribute(0x0024, bytes(12))])
    reply = StunServer([]).handle(data, CLIENT, PRIMARY, 0.0)
    assert len(data) == 36
    assert reply is not None and len(reply) <= max(len(data), smallest_reply(4)) == 40
    msg = parse_message(reply)
    assert msg.get(ErrorCode) == ErrorCode(420) and not msg.fingerprint


# --- silence --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg_class", "method", "outcome"),
    [
        (MessageClass.SUCCESS, BINDING, "not_request"),
        (MessageClass.ERROR, BINDING, "not_request"),
        (MessageClass.INDICATION, BINDING, "not_request"),
        (MessageClass.REQUEST, 0x003, "unsupported_method"),  # TURN Allocate
    ],
)
def test_no_reply_to_non_binding_requests(
    server: StunServer, seen: Recorder, msg_class: MessageClass, method: int, outcome: str
) -> None:
    data = build_message(method, msg_class, TXID, [Software(" " * 200)], fingerprint=True)
    assert server.handle(data, CLIENT, PRIMARY, 0.0) is None
    assert seen.counts == {outcome: 1}


@pytest.mark.parametrize(
    ("data", "outcome"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not_stun"),
        (b"\x01\x00\x00\x00" + bytes(144), "not_stun"),  # a WireGuard handshake initiation
        (request(size=REQUEST_SIZE) + b"\x00" * 4, "bad_header"),
        (request(size=REQUEST_SIZE)[:-1] + b"\x00", "bad_fingerprint"),
    ],
)
def test_unparsable_is_dropped_and_counted(
    server: StunServer, seen: Recorder, data: bytes, outcome: str
) -> None:
    assert server.handle(data, CLIENT, PRIMARY, 0.0) is None
    assert seen.counts == {outcome: 1}


def test_every_codec_reason_is_a_declared_outcome() -> None:
    def subclasses(cls: type[errors.StunError]) -> list[type[errors.StunError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    reasons = {c.reason for c in subclasses(errors.StunError)} - {"unexpected"}
    assert reasons <= set(OUTCOMES)


# --- amplification --------------------------------------------------------------


PLAIN = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + TXID  # any RFC 8489 client's request


def with_fingerprint(data: bytes) -> bytes:
    head = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:]
    return head + struct.pack("!HHI", 0x8028, 4, zlib.crc32(head) ^ 0x5354554E)


def bound(data: bytes, source: tuple[str, int]) -> int:
    return max(len(data), smallest_reply(6 if ip_address(source[0]).version == 6 else 4))


@pytest.mark.parametrize("data", [PLAIN, with_fingerprint(PLAIN)], ids=["20", "28"])
@pytest.mark.parametrize(
    ("source", "size"), [(CLIENT, 40), (("2001:db8::7", 5555), 52)], ids=["ipv4", "ipv6"]
)
def test_plain_request_gets_the_smallest_complete_reply(
    data: bytes, source: tuple[str, int], size: int, seen: Recorder
) -> None:
    local = PRIMARY if size == 40 else ("::1", 3478)
    reply = StunServer([local], observe=seen).handle(data, source, local, 0.0)
    assert reply is not None and len(reply) == size == bound(data, source)
    assert parse_binding_response(reply, TXID).mapped == source
    mapped = XorMappedAddress(ip_address(source[0]), source[1])
    assert reply == build_message(BINDING, MessageClass.SUCCESS, TXID, [mapped], fingerprint=True)
    assert seen.counts == {"success": 1}


def test_smallest_reply_is_xor_mapped_address_and_fingerprint() -> None:
    for family, ip in ((4, IPv4Address("192.0.2.1")), (6, IPv6Address("2001:db8::1"))):
        reply = build_message(
            BINDING, MessageClass.SUCCESS, TXID, [XorMappedAddress(ip, 1)], fingerprint=True
        )
        assert smallest_reply(family) == len(reply)


SOURCES = [CLIENT, ("2001:db8::7", 5555), ("::ffff:192.0.2.10", 40000)]


@pytest.mark.parametrize("size", [20, 24, *range(28, 136, 4)])
@pytest.mark.parametrize("source", SOURCES, ids=["ipv4", "ipv6", "mapped"])
@pytest.mark.parametrize("fingerprint", [True, False])
def test_every_reply_size_is_within_the_bound(
    size: int, source: tuple[str, int], fingerprint: bool
) -> None:
    six = ip_address(source[0]).version == 6 and not source[0].startswith("::ffff:")
    locals_ = [("::1", 1), ("::2", 2)] if six else [PRIMARY, SECONDARY]
    data = padded(size, fingerprint)
    reply = StunServer(locals_).handle(data, source, locals_[0], 0.0)
    assert reply is not None  # every well-formed Binding request is answered
    family = 6 if six else 4
    assert len(reply) <= max(len(data), smallest_reply(family))
    assert parse_binding_response(reply, TXID).mapped[1] == source[1]


def padded(size: int, fingerprint: bool) -> bytes:
    """A Binding request of exactly ``size`` bytes (an optional attribute as padding)."""
    room = size - 20 - (8 if fingerprint else 0)
    attrs = [] if room <= 0 else [RawAttribute(0x8029, bytes(room - 4))]
    data = build_message(BINDING, MessageClass.REQUEST, TXID, attrs, fingerprint=fingerprint)
    assert len(data) == size or room < 0
    return data


@pytest.mark.parametrize("size", [40, 52, 64, 76, 100])
@pytest.mark.parametrize("source", SOURCES[:2], ids=["ipv4", "ipv6"])
def test_template_replies_are_what_the_codec_builds(size: int, source: tuple[str, int]) -> None:
    """The precomputed reply equals build_message of the fullest attribute list that fits."""
    six = ":" in source[0]
    locals_ = [("::1", 1), ("::2", 2)] if six else [PRIMARY, SECONDARY]
    ip = ip_address(source[0])
    full: list[Attribute] = [
        XorMappedAddress(ip, source[1]),
        ResponseOrigin(ip_address(locals_[0][0]), locals_[0][1]),
        OtherAddress(ip_address(locals_[1][0]), locals_[1][1]),
        Software("wiregate"),
    ]
    fits = [
        build_message(BINDING, MessageClass.SUCCESS, TXID, full[:n], fingerprint=True)
        for n in range(4, 0, -1)
    ]
    expected = next(r for r in fits if len(r) <= max(size, smallest_reply(6 if six else 4)))
    for data in (padded(size, True), padded(size, False)):
        assert StunServer(locals_).handle(data, source, locals_[0], 0.0) == expected


def test_shedding_order_software_other_origin_fingerprint() -> None:
    server, kinds = StunServer([PRIMARY, SECONDARY]), []
    for size in (76, 64, 52, 40, 32):
        reply = server.handle(request(size=size), CLIENT, PRIMARY, 0.0)
        msg = parse_message(reply or b"")
        kinds.append((*(type(a).__name__ for a in msg.attributes), msg.fingerprint))
    assert kinds == [
        ("XorMappedAddress", "ResponseOrigin", "OtherAddress", "Software", True),
        ("XorMappedAddress", "ResponseOrigin", "OtherAddress", True),
        ("XorMappedAddress", "ResponseOrigin", True),
        ("XorMappedAddress", True),
        ("XorMappedAddress", True),  # FINGERPRINT is part of the smallest complete reply
    ]


# --- rate limits (fake clock: ``now`` is an argument) ------------------------------


def test_token_bucket_refills_with_time() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, tokens=3.0, stamp=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)
    assert bucket.take(100.5)
    assert not bucket.take(99.0)  # a clock going backwards earns nothing
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_server_rate_limits_per_source(seen: Recorder) -> None:
    server = StunServer([PRIMARY], limiter=RateLimiter(rate=1.0, burst=2.0), observe=seen)
    data = request(size=REQUEST_SIZE)
    replies = [server.handle(data, CLIENT, PRIMARY, 10.0) for _ in range(3)]
    assert [r is not None for r in replies] == [True, True, False]
    assert server.handle(data, ("192.0.2.11", 40000), PRIMARY, 10.0) is not None  # another source
    assert server.handle(data, CLIENT, PRIMARY, 10.5) is None
    assert server.handle(data, CLIENT, PRIMARY, 11.0) is not None
    assert seen.counts == {"success": 4, "rate_limited": 2}


def test_source_port_does_not_escape_the_limit() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.allow(IPv4Address("192.0.2.1"), 0.0)
    assert not limiter.allow(IPv4Address("192.0.2.1"), 0.0)


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.allow(IPv6Address("2001:db8:0:1::1"), 0.0)
    assert not limiter.allow(IPv6Address("2001:db8:0:1:ffff::2"), 0.0)
    assert limiter.allow(IPv6Address("2001:db8:0:2::1"), 0.0)


def test_global_bucket_caps_all_sources() -> None:
    limiter = RateLimiter(rate=10.0, burst=10.0, global_rate=1.0, global_burst=3.0)
    allowed = [limiter.allow(ip_address(f"192.0.2.{i}"), 0.0) for i in range(5)]
    assert allowed == [True, True, True, False, False]


def test_tracked_sources_are_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_sources=100)
    for i in range(1000):
        limiter.allow(IPv4Address(i), 0.0)
    assert len(limiter) == 100

"""STUN codec properties: what is built parses back, and what is damaged is refused.

- build -> parse round trips of generated messages; arbitrary bytes, arbitrary
  bodies behind a valid header and mutated messages only ever raise
  :class:`StunError`; the server never raises and never answers with more than
  max(request, the smallest complete reply).
- datagrams assembled TLV by TLV, with correct or broken lengths, random
  padding and a correct FINGERPRINT when asked, so most of them parse: whatever
  parses re-encodes to a message that parses to the same thing; whatever is
  refused is refused with a :class:`StunError` carrying a declared reason; and
  MESSAGE-INTEGRITY verifies under its key and no other, over every byte before it.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import StunError
from relay.stun import (
    MAGIC_COOKIE,
    AttrType,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    MessageClass,
    OtherAddress,
    RawAttribute,
    ResponseOrigin,
    Software,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    build_message,
    parse_message,
    verify_integrity,
)
from relay.stun_core import StunServer, smallest_reply

_KNOWN = {int(t) for t in AttrType}
ips = st.one_of(
    st.ip_addresses(v=4).map(lambda a: IPv4Address(int(a))),
    st.ip_addresses(v=6).map(lambda a: IPv6Address(int(a))),
)
ports = st.integers(0, 65535)
text = st.text(max_size=120)
addresses = st.one_of(
    *(
        st.builds(cls, ips, ports)
        for cls in (XorMappedAddress, MappedAddress, ResponseOrigin, OtherAddress)
    )
)
attribute = st.one_of(
    addresses,
    st.builds(Software, text),
    st.builds(Username, text),
    st.builds(ErrorCode, st.integers(300, 699), text),
    st.builds(UnknownAttributes, st.lists(st.integers(0, 0xFFFF), max_size=8).map(tuple)),
    st.builds(ChangeRequest, st.booleans(), st.booleans()),
    st.builds(
        RawAttribute,
        st.integers(0, 0xFFFF).filter(lambda t: t not in _KNOWN),
        st.binary(max_size=40),
    ),
)


def unique_types(attrs: list[object]) -> list[object]:
    seen: dict[type | int, object] = {}
    for a in attrs:
        seen.setdefault(a.type if isinstance(a, RawAttribute) else type(a), a)
    return list(seen.values())


messages = st.tuples(
    st.integers(0, 0xFFF),
    st.sampled_from(MessageClass),
    st.binary(min_size=12, max_size=12),
    st.lists(attribute, max_size=8).map(unique_types),
    st.one_of(st.none(), st.binary(max_size=32)),
    st.booleans(),
)


@given(messages)
def test_build_then_parse_round_trips(m: tuple) -> None:  # type: ignore[type-arg]
    method, klass, txid, attrs, key, fingerprint = m
    data = build_message(method, klass, txid, attrs, integrity_key=key, fingerprint=fingerprint)
    msg = parse_message(data)
    assert (msg.method, msg.msg_class, msg.transaction_id) == (method, klass, txid)
    assert list(msg.attributes) == attrs
    assert msg.fingerprint == fingerprint
    assert (msg.integrity is not None) == (key is not None)
    if key is not None:
        assert verify_integrity(data, key)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_stun_error(data: bytes) -> None:
    with contextlib.suppress(StunError):
        parse_message(data)


@given(
    st.binary(max_size=180).map(lambda b: b[: len(b) - len(b) % 4]),
    st.binary(min_size=12, max_size=12),
)
def test_arbitrary_bodies_behind_a_valid_header(body: bytes, txid: bytes) -> None:
    data = b"\x00\x01" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + txid + body
    with contextlib.suppress(StunError):
        parse_message(data)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        i = where % (len(buf) + 1)
        if op == "flip" and i < len(buf):
            buf[i] ^= value
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = bytes([value])
    return bytes(buf)


@settings(max_examples=500)
@given(messages, st.lists(mutation, min_size=1, max_size=4))
def test_mutated_messages_only_raise_stun_error(m: tuple, ops: list) -> None:  # type: ignore[type-arg]
    method, klass, txid, attrs, key, fingerprint = m
    data = mutate(
        build_message(method, klass, txid, attrs, integrity_key=key, fingerprint=fingerprint), ops
    )
    try:
        parse_message(data)
        verify_integrity(data, key or b"k")
    except StunError:
        pass


@settings(max_examples=300)
@given(messages, st.lists(mutation, max_size=3))
def test_server_never_raises_and_never_amplifies(m: tuple, ops: list) -> None:  # type: ignore[type-arg]
    method, klass, txid, attrs, key, fingerprint = m
    data = mutate(
        build_message(method, klass, txid, attrs, integrity_key=key, fingerprint=fingerprint), ops
    )
    server = StunServer([("127.0.0.1", 3478), ("127.0.0.2", 3479)])
    reply = server.handle(data, ("192.0.2.1", 40000), ("127.0.0.1", 3478), 0.0)
    assert reply is None or len(reply) <= max(len(data), smallest_reply(4))


# -- datagrams assembled TLV by TLV ----------------------------------------------

REASONS = {
    "malformed",
    "not_stun",
    "bad_header",
    "bad_attribute",
    "bad_fingerprint",
    "misplaced_attribute",
    "duplicate_attribute",
}
TYPES = [int(t) for t in AttrType]
VALUE_SIZES = [0, 1, 2, 4, 8, 12, 16, 20, 24, 32]


def tlv(atype: int, value: bytes, pad: bytes) -> bytes:
    padding = (pad * 4)[: -len(value) % 4] if pad else bytes(-len(value) % 4)
    return struct.pack("!HH", atype, len(value)) + value + padding


def datagram(
    msg_type: int, txid: bytes, attrs: list[tuple[int, bytes, bytes]], fingerprint: bool
) -> bytes:
    body = b"".join(tlv(*a) for a in attrs)
    head = struct.pack("!HHI", msg_type, len(body) + (8 if fingerprint else 0), MAGIC_COOKIE)
    data = head + txid + body
    if fingerprint:
        crc = zlib.crc32(data) ^ 0x5354554E
        data += struct.pack("!HHI", AttrType.FINGERPRINT, 4, crc)
    return data


attr_value = st.one_of(
    st.sampled_from(VALUE_SIZES).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.binary(max_size=40),
    st.builds(  # an address attribute's shape: family 1 or 2 and a plausible size
        lambda fam, port, raw: bytes([0, fam]) + port.to_bytes(2, "big") + raw,
        st.sampled_from([1, 2]),
        st.integers(0, 0xFFFF),
        st.sampled_from([4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    ),
    st.builds(  # an error code's shape
        lambda klass, number, reason: bytes([0, 0, klass, number]) + reason.encode(),
        st.integers(0, 7),
        st.integers(0, 120),
        st.text(max_size=20),
    ),
)
assembled = st.builds(
    datagram,
    st.one_of(st.integers(0, 0x3FFF), st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011])),
    st.binary(min_size=12, max_size=12),
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(TYPES), st.integers(0, 0xFFFF)),
            attr_value,
            st.one_of(st.just(b""), st.binary(min_size=1, max_size=1)),
        ),
        max_size=6,
    ),
    st.booleans(),
)


def reparse(data: bytes) -> None:
    """Parse; if accepted, rebuilding the message (integrity aside) gives the same message."""
    try:
        msg = parse_message(data)
    except StunError as exc:
        assert exc.reason in REASONS and 400 <= exc.stun_code < 700
        return
    sealed = msg.integrity is not None or any(
        getattr(a, "type", None) == AttrType.MESSAGE_INTEGRITY_SHA256 for a in msg.attributes
    )
    if sealed:  # the HMAC cannot be rebuilt without the key
        return
    again = build_message(
        msg.method, msg.msg_class, msg.transaction_id, msg.attributes, fingerprint=msg.fingerprint
    )
    assert parse_message(again) == msg
    assert len(again) == len(data)


@given(assembled)
def test_assembled_datagrams_reparse_or_are_refused_with_a_reason(data: bytes) -> None:
    reparse(data)


@given(assembled, st.integers(0, 10_000), st.integers(1, 255))
def test_one_corrupted_byte_reparses_or_is_refused(data: bytes, where: int, xor: int) -> None:
    buf = bytearray(data)
    buf[where % len(buf)] ^= xor
    reparse(bytes(buf))


@given(
    st.binary(min_size=12, max_size=12),
    st.text(max_size=60),
    st.binary(min_size=1, max_size=40),
    st.binary(min_size=1, max_size=40),
    st.booleans(),
)
def test_integrity_verifies_under_its_key_only(
    txid: bytes, software: str, key: bytes, other: bytes, fingerprint: bool
) -> None:
    data = build_message(
        0x001,
        MessageClass.REQUEST,
        txid,
        [Software(software)],
        integrity_key=key,
        fingerprint=fingerprint,
    )
    assert verify_integrity(data, key)
    # HMAC pads keys shorter than its block with zero bytes: b"k" and b"k\0" are one key.
    same_key = other.rstrip(b"\0") == key.rstrip(b"\0")
    assert verify_integrity(data, other) == same_key


@given(
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=1, max_size=20),
    st.integers(1, 255),
)
def test_integrity_covers_every_byte_before_it(txid: bytes, key: bytes, xor: int) -> None:
    msg = build_message(0x001, MessageClass.REQUEST, txid, [Software("x")], integrity_key=key)
    covered = len(msg) - 24  # the MESSAGE-INTEGRITY attribute itself is the last 24 bytes
    failed, refused = 0, 0
    for where in range(covered):  # every covered byte, one at a time
        data = bytearray(msg)
        data[where] ^= xor
        try:
            verified = verify_integrity(bytes(data), key)
        except StunError as exc:  # the corruption broke the framing
            assert exc.reason in REASONS
            refused += 1
        else:
            assert not verified, f"byte {where} is not covered"
            failed += 1
    assert failed + refused == covered
    # the length and magic cookie (bytes 2-7) frame the message: a change is refused;
    # the transaction ID (bytes 8-19) does not: a change reaches the integrity check
    assert refused >= 6 and failed >= 12


@pytest.mark.parametrize(
    "data",
    [
        # a SOFTWARE attribute of 0 bytes whose padding would be 4 bytes: no padding follows
        b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12) + b"\x80\x22\x00\x00",
        # XOR-MAPPED-ADDRESS with a non-zero reserved byte: read, rebuilt with a zero byte
        b"\x01\x01\x00\x0c\x21\x12\xa4\x42" + bytes(12) + b"\x00\x20\x00\x08\xff\x01\x00\x00"
        b"\x21\x12\xa4\x43",
    ],
)
def test_lenient_fields_reparse(data: bytes) -> None:
    reparse(data)

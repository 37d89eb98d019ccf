"""More STUN codec properties (tests/unit/relay/test_stun_fuzz.py has build -> parse round trips).

Here datagrams are assembled TLV by TLV, with correct or broken lengths, random
padding and a correct FINGERPRINT when asked, so most of them parse: whatever
parses re-encodes to a message that parses to the same thing; whatever is
refused is refused with a :class:`StunError` carrying a declared reason; and
MESSAGE-INTEGRITY verifies under its key and no other.
"""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import StunError
from relay.stun import (
    MAGIC_COOKIE,
    AttrType,
    MessageClass,
    Software,
    build_message,
    parse_message,
    verify_integrity,
)

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
    assert verify_integrity(data, other) == (other == key)


@given(
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=1, max_size=20),
    st.integers(0, 10_000),
    st.integers(1, 255),
)
def test_integrity_covers_every_byte_before_it(
    txid: bytes, key: bytes, where: int, xor: int
) -> None:
    msg = build_message(0x001, MessageClass.REQUEST, txid, [Software("x")], integrity_key=key)
    data = bytearray(msg)
    covered = len(data) - 24  # the MESSAGE-INTEGRITY attribute itself is the last 24 bytes
    data[where % covered] ^= xor
    with contextlib.suppress(StunError):  # or the corruption broke the framing
        assert not verify_integrity(bytes(data), key)


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

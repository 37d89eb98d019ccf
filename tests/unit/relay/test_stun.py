"""The STUN codec against the RFC 5769 test vectors and hand-made faults."""

from __future__ import annotations

import struct
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address

import pytest

from relay.errors import (
    BadFingerprint,
    DuplicateAttribute,
    MalformedAttribute,
    MalformedHeader,
    MisplacedAttribute,
    NotStun,
    StunError,
)
from relay.stun import (
    BINDING,
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


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TXID = h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")

# RFC 5769 section 2.1: Binding request, SOFTWARE, PRIORITY, ICE-CONTROLLED,
# USERNAME "evtj:h6vY", MESSAGE-INTEGRITY, FINGERPRINT (padding is 0x20 on purpose).
SAMPLE_REQUEST = h("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
""")

# RFC 5769 section 2.2: success response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
SAMPLE_IPV4_RESPONSE = h("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
""")

# RFC 5769 section 2.3: the same, [2001:db8:1234:5678:11:2233:4455:6677]:32853.
SAMPLE_IPV6_RESPONSE = h("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
""")


# --- RFC 5769 vectors -----------------------------------------------------------


def test_sample_request_parses() -> None:
    msg = parse_message(SAMPLE_REQUEST)
    assert (msg.method, msg.msg_class, msg.transaction_id) == (BINDING, MessageClass.REQUEST, TXID)
    assert msg.attributes == (
        Software("STUN test client"),
        RawAttribute(0x0024, h("6e 00 01 ff")),  # PRIORITY
        RawAttribute(0x8029, h("93 2f f9 b1 51 26 3b 36")),  # ICE-CONTROLLED
        Username("evtj:h6vY"),
    )
    assert msg.fingerprint
    assert msg.integrity == h("9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2")


@pytest.mark.parametrize("vector", [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE])
def test_vectors_verify_with_the_password(vector: bytes) -> None:
    assert verify_integrity(vector, PASSWORD)
    assert not verify_integrity(vector, PASSWORD + b"x")


def test_sample_ipv4_response() -> None:
    msg = parse_message(SAMPLE_IPV4_RESPONSE)
    assert msg.msg_class is MessageClass.SUCCESS
    assert msg.get(Software) == Software("test vector")
    assert msg.get(XorMappedAddress) == XorMappedAddress(IPv4Address("192.0.2.1"), 32853)


def test_sample_ipv6_response() -> None:
    msg = parse_message(SAMPLE_IPV6_RESPONSE)
    ip = IPv6Address("2001:db8:1234:5678:11:2233:4455:6677")
    assert msg.get(XorMappedAddress) == XorMappedAddress(ip, 32853)


def test_xor_address_encoding_matches_the_vectors() -> None:
    v4 = build_message(
        BINDING, MessageClass.SUCCESS, TXID, [parse_message(SAMPLE_IPV4_RESPONSE).attributes[1]]
    )
    assert v4[20:] == h("00 20 00 08 00 01 a1 47 e1 12 a6 43")
    v6 = build_message(
        BINDING, MessageClass.SUCCESS, TXID, [parse_message(SAMPLE_IPV6_RESPONSE).attributes[1]]
    )
    assert v6[20:] == h("00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9")


def test_vector_tampering_breaks_integrity_or_fingerprint() -> None:
    tampered = bytearray(SAMPLE_IPV4_RESPONSE)
    tampered[34] ^= 1  # inside XOR-MAPPED-ADDRESS
    with pytest.raises(BadFingerprint):
        parse_message(bytes(tampered))
    no_fp = SAMPLE_IPV4_RESPONSE[:-8]
    no_fp = no_fp[:2] + struct.pack("!H", len(no_fp) - 20) + no_fp[4:]
    assert not parse_message(no_fp).fingerprint
    assert verify_integrity(no_fp, PASSWORD)  # the HMAC covers what precedes it only
    broken = bytearray(no_fp)
    broken[40] ^= 1
    assert not verify_integrity(bytes(broken), PASSWORD)


# --- building -------------------------------------------------------------------


def test_build_with_integrity_and_fingerprint_round_trips() -> None:
    attrs = (Username("evtj:h6vY"), Software("wiregate"))
    data = build_message(
        BINDING, MessageClass.REQUEST, TXID, attrs, integrity_key=PASSWORD, fingerprint=True
    )
    msg = parse_message(data)
    assert msg.attributes == attrs and msg.fingerprint and msg.integrity is not None
    assert verify_integrity(data, PASSWORD)


def test_message_type_interleaves_class_bits() -> None:
    assert build_message(BINDING, MessageClass.REQUEST, TXID)[:2] == b"\x00\x01"
    assert build_message(BINDING, MessageClass.INDICATION, TXID)[:2] == b"\x00\x11"
    assert build_message(BINDING, MessageClass.SUCCESS, TXID)[:2] == b"\x01\x01"
    assert build_message(BINDING, MessageClass.ERROR, TXID)[:2] == b"\x01\x11"
    msg = parse_message(build_message(0xFFF, MessageClass.ERROR, TXID))
    assert (msg.method, msg.msg_class) == (0xFFF, MessageClass.ERROR)


def test_all_modelled_attributes_round_trip() -> None:
    attrs = (
        MappedAddress(IPv4Address("198.51.100.7"), 1),
        ResponseOrigin(IPv6Address("2001:db8::1"), 3478),
        OtherAddress(IPv4Address("203.0.113.9"), 3479),
        ErrorCode(420, "Unknown Attribute"),
        UnknownAttributes((0x0024, 0x0003, 0x7FFF)),
        ChangeRequest(change_ip=True, change_port=False),
        RawAttribute(0x8029, b"\x01\x02\x03"),
    )
    assert (
        parse_message(build_message(BINDING, MessageClass.ERROR, TXID, attrs)).attributes == attrs
    )


@pytest.mark.parametrize(
    "attr",
    [
        ErrorCode(200, "OK"),
        ErrorCode(700),
        Software("x" * 800),
        XorMappedAddress(IPv4Address("1.2.3.4"), 70000),
        RawAttribute(AttrType.FINGERPRINT, b"abcd"),
        RawAttribute(AttrType.SOFTWARE, b"abc"),
        UnknownAttributes((0x10000,)),
    ],
)
def test_build_refuses_what_would_not_read_back(attr: object) -> None:
    with pytest.raises(ValueError):
        build_message(BINDING, MessageClass.SUCCESS, TXID, [attr])  # type: ignore[list-item]


def test_build_refuses_bad_transaction_id() -> None:
    with pytest.raises(ValueError):
        build_message(BINDING, MessageClass.REQUEST, b"short")


# --- refusals -------------------------------------------------------------------


def msg_with(*tlvs: bytes, txid: bytes = TXID, msg_type: int = 0x0001) -> bytes:
    body = b"".join(tlvs)
    return struct.pack("!HHI", msg_type, len(body), 0x2112A442) + txid + body


def tlv(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", NotStun),
        (SAMPLE_REQUEST[:19], NotStun),
        (b"\x40" + SAMPLE_REQUEST[1:], NotStun),  # top bits set
        (SAMPLE_REQUEST[:4] + b"\x21\x12\xa4\x43" + SAMPLE_REQUEST[8:], NotStun),
        (SAMPLE_REQUEST + b"\x00\x00\x00\x00", MalformedHeader),  # trailing bytes
        (SAMPLE_REQUEST[:-4], MalformedHeader),  # truncated
        (msg_with(b"\x80\x22\x00\x01a"), MalformedHeader),  # length 5
        (msg_with(struct.pack("!HH", 0x8022, 8) + b"abcd"), MalformedAttribute),  # overrun
        (msg_with(tlv(0x0020, b"\x00\x03\x00\x01" + bytes(4))), MalformedAttribute),  # family 3
        (
            msg_with(tlv(0x0001, b"\x00\x01\x00\x01" + bytes(16))),
            MalformedAttribute,
        ),  # v4, 16 bytes
        (msg_with(tlv(0x0020, b"\x00\x01")), MalformedAttribute),
        (msg_with(tlv(0x8022, b"\xff\xfe")), MalformedAttribute),  # not UTF-8
        (msg_with(tlv(0x0009, b"\x00\x00\x02\x00")), MalformedAttribute),  # class 2
        (msg_with(tlv(0x000A, b"\x00\x24\x00")), MalformedAttribute),
        (msg_with(tlv(0x0003, b"\x00")), MalformedAttribute),
        (msg_with(tlv(0x8022, b"a"), tlv(0x8022, b"b")), DuplicateAttribute),
        (msg_with(tlv(0x0008, bytes(20)), tlv(0x8022, b"a")), MisplacedAttribute),
        (msg_with(tlv(0x0008, bytes(20)), tlv(0x0008, bytes(20))), DuplicateAttribute),
        (msg_with(tlv(0x001C, bytes(32)), tlv(0x0008, bytes(20))), MisplacedAttribute),
        (msg_with(tlv(0x0008, bytes(19))), MisplacedAttribute),
        (msg_with(tlv(0x001C, bytes(15))), MalformedAttribute),
        (SAMPLE_REQUEST[:-1] + bytes([SAMPLE_REQUEST[-1] ^ 1]), BadFingerprint),
        (msg_with(tlv(0x8028, bytes(3))), BadFingerprint),
    ],
)
def test_refused(data: bytes, error: type[StunError]) -> None:
    with pytest.raises(error):
        parse_message(data)


def test_fingerprint_must_be_last() -> None:
    good = build_message(BINDING, MessageClass.REQUEST, TXID, fingerprint=True)
    extra = tlv(0x8022, b"late")
    data = good[:2] + struct.pack("!H", len(good) - 20 + len(extra)) + good[4:] + extra
    with pytest.raises(BadFingerprint):
        parse_message(data)


def test_integrity_sha256_may_follow_integrity() -> None:
    data = msg_with(tlv(0x0008, bytes(20)), tlv(0x001C, bytes(32)))
    msg = parse_message(data)
    assert msg.integrity == bytes(20)
    assert msg.attributes == (RawAttribute(AttrType.MESSAGE_INTEGRITY_SHA256, bytes(32)),)


def test_verify_integrity_without_integrity_is_false() -> None:
    assert not verify_integrity(build_message(BINDING, MessageClass.REQUEST, TXID), PASSWORD)


def test_errors_carry_reason_and_stun_code() -> None:
    with pytest.raises(StunError) as info:
        parse_message(b"x")
    assert (info.value.reason, info.value.stun_code, info.value.status) == ("not_stun", 400, 400)


def test_relay_package_imports_nothing_eagerly() -> None:
    code = "import sys, relay; print(sorted(m for m in sys.modules if m.startswith('relay.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

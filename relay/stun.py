"""Sans-IO STUN codec (RFC 8489, compatible with RFC 5389; RFC 5780 attributes).

``parse_message(data)`` turns one datagram into a :class:`Message` or raises a
:class:`~relay.errors.StunError`; ``build_message(...)`` does the reverse.
MESSAGE-INTEGRITY and FINGERPRINT are facts about the whole message, not
entries of ``Message.attributes``: the parser checks FINGERPRINT's CRC and its
position, keeps the MESSAGE-INTEGRITY HMAC in ``Message.integrity`` (check it
with :func:`verify_integrity` against the raw bytes), and the builder appends
both on request. Attributes the codec does not model come back as
:class:`RawAttribute`; deciding which of those are fatal (420) is the server's job.

The codec is strict: trailing bytes, duplicate attribute types (RFC 8489 lets a
receiver keep the first; wiregate refuses the message) and any attribute after
MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are errors.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from relay.errors import (
    BadFingerprint,
    DuplicateAttribute,
    MalformedAttribute,
    MalformedHeader,
    MisplacedAttribute,
    NotStun,
    StunError,
)

__all__ = [
    "BINDING",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "AttrType",
    "Attribute",
    "ChangeRequest",
    "ErrorCode",
    "IPAddress",
    "MappedAddress",
    "Message",
    "MessageClass",
    "OtherAddress",
    "RawAttribute",
    "ResponseOrigin",
    "Software",
    "UnknownAttributes",
    "Username",
    "XorMappedAddress",
    "build_message",
    "parse_message",
    "verify_integrity",
]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
BINDING = 0x001
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_FINGERPRINT_XOR = 0x5354554E
_MAX_TEXT = 763  # bytes: SOFTWARE, reason phrase (RFC 8489: < 128 characters)
_MAX_USERNAME = 513

IPAddress = IPv4Address | IPv6Address


class MessageClass(IntEnum):
    """The two class bits of the message type."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class AttrType(IntEnum):
    """Attribute types the codec or the server knows about."""

    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


@dataclass(frozen=True, slots=True)
class XorMappedAddress:
    """The reflexive transport address, XOR-obfuscated on the wire."""

    ip: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class MappedAddress:
    """The reflexive transport address in the clear (RFC 3489 servers)."""

    ip: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class ResponseOrigin:
    """RFC 5780: the address and port the response was sent from."""

    ip: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class OtherAddress:
    """RFC 5780: the server's other address, for NAT mapping classification."""

    ip: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class Software:
    """A textual description of the sending software."""

    text: str


@dataclass(frozen=True, slots=True)
class Username:
    """The user name of a credential (short-term: ``ufrag:ufrag`` in ICE)."""

    name: str


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """An error response's code (300..699) and reason phrase."""

    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class UnknownAttributes:
    """The comprehension-required attribute types a 420 response refused."""

    types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    """RFC 5780: ask the server to answer from its other IP and/or port."""

    change_ip: bool = False
    change_port: bool = False


@dataclass(frozen=True, slots=True)
class RawAttribute:
    """An attribute the codec does not interpret: its type and value as received."""

    type: int
    value: bytes


Attribute = (
    XorMappedAddress
    | MappedAddress
    | ResponseOrigin
    | OtherAddress
    | Software
    | Username
    | ErrorCode
    | UnknownAttributes
    | ChangeRequest
    | RawAttribute
)
_AddressAttr = XorMappedAddress | MappedAddress | ResponseOrigin | OtherAddress


@dataclass(frozen=True, slots=True)
class Message:
    """One STUN message. ``integrity`` is the received MESSAGE-INTEGRITY HMAC, if any."""

    method: int
    msg_class: MessageClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    integrity: bytes | None = None
    fingerprint: bool = False

    def get(self, kind: type[Attribute]) -> Attribute | None:
        """The first attribute of that class, or None."""
        return next((a for a in self.attributes if isinstance(a, kind)), None)


# --- header -------------------------------------------------------------------


def _encode_type(method: int, msg_class: MessageClass) -> int:
    m, c = method, int(msg_class)
    return (
        (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    )


def _decode_type(msg_type: int) -> tuple[int, MessageClass]:
    method = (msg_type & 0x000F) | ((msg_type >> 1) & 0x0070) | ((msg_type >> 2) & 0x0F80)
    return method, MessageClass(((msg_type >> 4) & 1) | ((msg_type >> 7) & 2))


def _parse_header(data: bytes) -> tuple[int, MessageClass, bytes]:
    if len(data) < HEADER_SIZE:
        raise NotStun(f"{len(data)} bytes is shorter than a STUN header")
    msg_type, length = struct.unpack_from("!HH", data)
    if msg_type & 0xC000:
        raise NotStun("the two top bits of the message type are not zero")
    if data[4:8] != _COOKIE_BYTES:
        raise NotStun("wrong magic cookie")
    if length % 4:
        raise MalformedHeader(f"message length {length} is not a multiple of 4")
    if HEADER_SIZE + length != len(data):
        raise MalformedHeader(f"length field says {length}, datagram body is {len(data) - 20}")
    return (*_decode_type(msg_type), bytes(data[8:20]))


# --- attribute values ---------------------------------------------------------


def _xor_key(txid: bytes) -> bytes:
    return _COOKIE_BYTES + txid


def _decode_address(value: bytes, xor: bytes | None) -> tuple[IPAddress, int]:
    if len(value) < 4:
        raise MalformedAttribute("address attribute shorter than 4 bytes")
    family, port = value[1], struct.unpack_from("!H", value, 2)[0]
    raw = value[4:]
    if (family, len(raw)) not in ((1, 4), (2, 16)):
        raise MalformedAttribute(f"bad address family {family} or length {len(value)}")
    if xor is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor, strict=False))
    return (IPv4Address(raw) if family == 1 else IPv6Address(raw)), port


def _encode_address(ip: IPAddress, port: int, xor: bytes | None) -> bytes:
    raw = ip.packed
    if xor is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor, strict=False))
    return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, port) + raw


def _decode_text(value: bytes, limit: int) -> str:
    if len(value) > limit:
        raise MalformedAttribute(f"text attribute of {len(value)} bytes is over {limit}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedAttribute("text attribute is not UTF-8") from exc


def _decode_error_code(value: bytes) -> ErrorCode:
    if len(value) < 4:
        raise MalformedAttribute("ERROR-CODE shorter than 4 bytes")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise MalformedAttribute(f"ERROR-CODE class {klass} number {number} out of range")
    return ErrorCode(klass * 100 + number, _decode_text(value[4:], _MAX_TEXT))


def _decode_unknown(value: bytes) -> UnknownAttributes:
    if len(value) % 2:
        raise MalformedAttribute("UNKNOWN-ATTRIBUTES length is odd")
    return UnknownAttributes(struct.unpack(f"!{len(value) // 2}H", value))


def _decode_change(value: bytes) -> ChangeRequest:
    if len(value) != 4:
        raise MalformedAttribute("CHANGE-REQUEST is not 4 bytes")
    flags = value[3]
    return ChangeRequest(change_ip=bool(flags & 4), change_port=bool(flags & 2))


def _address_decoder(cls: type[_AddressAttr], xor: bool) -> Callable[[bytes, bytes], Attribute]:
    def decode(value: bytes, txid: bytes) -> Attribute:
        return cls(*_decode_address(value, _xor_key(txid) if xor else None))

    return decode


_DECODERS: dict[int, Callable[[bytes, bytes], Attribute]] = {
    AttrType.XOR_MAPPED_ADDRESS: _address_decoder(XorMappedAddress, xor=True),
    AttrType.MAPPED_ADDRESS: _address_decoder(MappedAddress, xor=False),
    AttrType.RESPONSE_ORIGIN: _address_decoder(ResponseOrigin, xor=False),
    AttrType.OTHER_ADDRESS: _address_decoder(OtherAddress, xor=False),
    AttrType.SOFTWARE: lambda v, _: Software(_decode_text(v, _MAX_TEXT)),
    AttrType.USERNAME: lambda v, _: Username(_decode_text(v, _MAX_USERNAME)),
    AttrType.ERROR_CODE: lambda v, _: _decode_error_code(v),
    AttrType.UNKNOWN_ATTRIBUTES: lambda v, _: _decode_unknown(v),
    AttrType.CHANGE_REQUEST: lambda v, _: _decode_change(v),
}


def _encode_value(attr: Attribute, txid: bytes) -> tuple[int, bytes]:
    match attr:
        case XorMappedAddress(ip, port):
            return AttrType.XOR_MAPPED_ADDRESS, _encode_address(ip, port, _xor_key(txid))
        case MappedAddress(ip, port):
            return AttrType.MAPPED_ADDRESS, _encode_address(ip, port, None)
        case ResponseOrigin(ip, port):
            return AttrType.RESPONSE_ORIGIN, _encode_address(ip, port, None)
        case OtherAddress(ip, port):
            return AttrType.OTHER_ADDRESS, _encode_address(ip, port, None)
        case Software(text):
            return AttrType.SOFTWARE, text.encode()
        case Username(name):
            return AttrType.USERNAME, name.encode()
        case ErrorCode(code, reason):
            return AttrType.ERROR_CODE, struct.pack(
                "!HBB", 0, code // 100, code % 100
            ) + reason.encode()
        case UnknownAttributes(types):
            return AttrType.UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(types)}H", *types)
        case ChangeRequest(change_ip, change_port):
            return AttrType.CHANGE_REQUEST, struct.pack("!I", change_ip << 2 | change_port << 1)
        case RawAttribute(atype, value):
            return atype, value
    raise TypeError(f"not a STUN attribute: {attr!r}")


# --- message ------------------------------------------------------------------


def _tlv(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)


def _fingerprint(prefix: bytes) -> bytes:
    return struct.pack("!I", zlib.crc32(prefix) ^ _FINGERPRINT_XOR)


def _integrity(key: bytes, prefix: bytes) -> bytes:
    return hmac.new(key, prefix, hashlib.sha1).digest()


def _with_length(header: bytes, length: int) -> bytes:
    return header[:2] + struct.pack("!H", length) + header[4:]


def _walk(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """Yield (offset, type, value) of each attribute; checks bounds, not meaning."""
    offset = HEADER_SIZE
    while offset < len(data):
        atype, alen = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + alen
        if end + (-alen % 4) > len(data):
            raise MalformedAttribute(
                f"attribute 0x{atype:04x} of {alen} bytes overruns the message"
            )
        yield offset, atype, bytes(data[offset + 4 : end])
        offset = end + (-alen % 4)


@dataclass(slots=True)
class _Reader:
    """Per-message parser state: what was seen, and where integrity ended it."""

    data: bytes
    txid: bytes
    attributes: list[Attribute]
    seen: set[int]
    integrity: bytes | None = None
    sealed: bool = False  # MESSAGE-INTEGRITY(-SHA256) seen: only FINGERPRINT may follow
    fingerprint: bool = False

    def feed(self, offset: int, atype: int, value: bytes) -> None:
        if self.fingerprint:
            raise BadFingerprint("FINGERPRINT is not the last attribute")
        if atype in self.seen:
            raise DuplicateAttribute(f"attribute 0x{atype:04x} appears twice")
        self.seen.add(atype)
        if atype == AttrType.FINGERPRINT:
            self._fingerprint(offset, value)
        elif atype == AttrType.MESSAGE_INTEGRITY:
            self._integrity(value)
        elif atype == AttrType.MESSAGE_INTEGRITY_SHA256:
            self._integrity_sha256(value)
        elif self.sealed:
            raise MisplacedAttribute(f"attribute 0x{atype:04x} after MESSAGE-INTEGRITY")
        else:
            decode = _DECODERS.get(atype)
            self.attributes.append(
                decode(value, self.txid) if decode else RawAttribute(atype, value)
            )

    def _fingerprint(self, offset: int, value: bytes) -> None:
        if len(value) != 4 or value != _fingerprint(self.data[:offset]):
            raise BadFingerprint("FINGERPRINT does not match the message")
        self.fingerprint = True

    def _integrity(self, value: bytes) -> None:
        if self.sealed or len(value) != 20:
            raise MisplacedAttribute("MESSAGE-INTEGRITY misplaced or not 20 bytes")
        self.integrity, self.sealed = value, True

    def _integrity_sha256(self, value: bytes) -> None:
        if not 16 <= len(value) <= 32 or len(value) % 4:
            raise MalformedAttribute("MESSAGE-INTEGRITY-SHA256 of a bad length")
        self.attributes.append(RawAttribute(AttrType.MESSAGE_INTEGRITY_SHA256, value))
        self.sealed = True


def parse_message(data: bytes) -> Message:
    """Parse one datagram; raise a :class:`~relay.errors.StunError` for anything refused."""
    data = bytes(data)
    method, msg_class, txid = _parse_header(data)
    reader = _Reader(data, txid, [], set())
    for offset, atype, value in _walk(data):
        reader.feed(offset, atype, value)
    return Message(
        method, msg_class, txid, tuple(reader.attributes), reader.integrity, reader.fingerprint
    )


def build_message(
    method: int,
    msg_class: MessageClass,
    transaction_id: bytes,
    attributes: Iterable[Attribute] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
) -> bytes:
    """Encode a message; append MESSAGE-INTEGRITY (HMAC-SHA1 with ``integrity_key``)
    and FINGERPRINT when asked. Raises ValueError for values that cannot be encoded."""
    if len(transaction_id) != 12 or not 0 <= method <= 0xFFF:
        raise ValueError("transaction id must be 12 bytes and method 0..0xfff")
    header = struct.pack("!HH", _encode_type(method, msg_class), 0) + _COOKIE_BYTES + transaction_id
    body = b"".join(_tlv(*_checked(a, transaction_id)) for a in attributes)
    if integrity_key is not None:
        mac = _integrity(integrity_key, _with_length(header, len(body) + 24) + body)
        body += _tlv(AttrType.MESSAGE_INTEGRITY, mac)
    if fingerprint:
        body += _tlv(AttrType.FINGERPRINT, _fingerprint(_with_length(header, len(body) + 8) + body))
    return _with_length(header, len(body)) + body


def _checked(attr: Attribute, txid: bytes) -> tuple[int, bytes]:
    """Encode one attribute and make sure the parser would read back the same value."""
    try:
        atype, value = _encode_value(attr, txid)
        decode = _DECODERS.get(atype)
        same = decode(value, txid) == attr if decode else atype not in _MESSAGE_LEVEL
    except (struct.error, StunError) as exc:
        raise ValueError(f"attribute {attr!r} cannot be encoded: {exc}") from exc
    if not same or not 0 <= atype <= 0xFFFF or len(value) > 0xFFFF - 3:
        raise ValueError(f"attribute {attr!r} cannot be encoded")
    return atype, value


_MESSAGE_LEVEL = frozenset(
    {AttrType.MESSAGE_INTEGRITY, AttrType.MESSAGE_INTEGRITY_SHA256, AttrType.FINGERPRINT}
)


def verify_integrity(data: bytes, key: bytes) -> bool:
    """True when ``data`` parses and its MESSAGE-INTEGRITY is the HMAC-SHA1 under ``key``.

    For a short-term credential ``key`` is the (SASLprep'd) password, UTF-8 encoded.
    """
    data = bytes(data)
    if parse_message(data).integrity is None:
        return False
    offset, _, mac = next((o, t, v) for o, t, v in _walk(data) if t == AttrType.MESSAGE_INTEGRITY)
    expected = _integrity(key, _with_length(data[:HEADER_SIZE], offset + 4) + data[20:offset])
    return hmac.compare_digest(expected, mac)

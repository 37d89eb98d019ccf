"""Coverage-guided fuzzing of the STUN codec and server (relay/stun.py, relay/stun_core.py).

Properties: parsing raises only :class:`StunError`; a message that parses
(integrity aside) re-encodes to a message that parses to the same thing;
``verify_integrity`` answers or raises StunError; the server never raises and
never answers with more bytes than max(what it got, the smallest complete reply).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import atheris
from _harness import PROJECT, fuzz

with atheris.instrument_imports(include=PROJECT):
    from relay.errors import StunError
    from relay.stun import (
        AttrType,
        ChangeRequest,
        ErrorCode,
        MessageClass,
        OtherAddress,
        ResponseOrigin,
        Software,
        UnknownAttributes,
        Username,
        XorMappedAddress,
        build_message,
        parse_message,
        verify_integrity,
    )
    from relay.stun_core import RateLimiter, StunServer, smallest_reply

# Limits no fuzzing run reaches: every input gets past the rate limiter to the codec.
UNLIMITED = RateLimiter(1e12, 1e12, global_rate=1e12, global_burst=1e12)
SERVER = StunServer([("127.0.0.1", 3478), ("127.0.0.2", 3479)], limiter=UNLIMITED)
TXID = bytes(range(12))


def seeds() -> list[bytes]:
    v4, v6 = IPv4Address("192.0.2.1"), IPv6Address("2001:db8::1")
    return [
        build_message(0x001, MessageClass.REQUEST, TXID),
        build_message(0x001, MessageClass.REQUEST, TXID, [ChangeRequest(True, True)]),
        build_message(0x001, MessageClass.REQUEST, TXID, [Username("a:b")], integrity_key=b"k"),
        build_message(
            0x001,
            MessageClass.SUCCESS,
            TXID,
            [XorMappedAddress(v4, 40000), ResponseOrigin(v4, 3478), OtherAddress(v6, 3479)],
            fingerprint=True,
        ),
        build_message(0x001, MessageClass.SUCCESS, TXID, [XorMappedAddress(v6, 1)]),
        build_message(
            0x001,
            MessageClass.ERROR,
            TXID,
            [ErrorCode(420, "Unknown Attribute"), UnknownAttributes((0x0002, 0x7FFF))],
            fingerprint=True,
        ),
        build_message(0x001, MessageClass.INDICATION, TXID, [Software("wiregate")]),
    ]


def test_one_input(data: bytes) -> None:
    reply = SERVER.handle(data, ("192.0.2.9", 40000), ("127.0.0.1", 3478), 0.0)
    bound = max(len(data), smallest_reply(4))
    assert reply is None or len(reply) <= bound, "the STUN server amplified"
    try:
        msg = parse_message(data)
    except StunError:
        return
    try:
        verify_integrity(data, b"key")
    except StunError as exc:
        raise AssertionError("verify_integrity refused a message that parses") from exc
    sha256 = any(
        getattr(a, "type", None) == AttrType.MESSAGE_INTEGRITY_SHA256 for a in msg.attributes
    )
    if msg.integrity is None and not sha256:
        again = build_message(
            msg.method,
            msg.msg_class,
            msg.transaction_id,
            msg.attributes,
            fingerprint=msg.fingerprint,
        )
        assert parse_message(again) == msg, "re-encoding changed the message"


if __name__ == "__main__":
    fuzz(test_one_input, seeds())

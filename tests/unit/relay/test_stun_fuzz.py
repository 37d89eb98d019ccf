"""Property tests: build -> parse round trips; garbage and mutations only raise StunError."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import StunError
from relay.stun import (
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
from relay.stun_core import StunServer

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
    assert reply is None or len(reply) <= len(data)

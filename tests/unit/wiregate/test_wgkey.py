"""The WireGuard key codec refuses every malformed or weak key."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiregate.errors import BadKey
from wiregate.keys import (
    _LOW_ORDER,
    encode_key,
    fingerprint,
    generate_private_key,
    parse_public_key,
    public_from_private,
)


def test_generated_public_key_round_trips() -> None:
    public = encode_key(public_from_private(generate_private_key()))
    assert parse_public_key(public) == public
    assert len(fingerprint(public).split(":")) == 8


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        base64.b64encode(b"\x01" * 31).decode(),  # 31 bytes
        base64.b64encode(b"\x01" * 33).decode(),  # 33 bytes
        "!" * 44,
        base64.b64encode(bytes(32)).decode(),  # all-zero
        base64.b64encode(b"\x01" + bytes(31)).decode(),  # order 1 point
        base64.b64encode(bytes.fromhex("ecff" + "ff" * 29 + "7f")).decode(),  # p-1
        base64.b64encode(
            bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
        ).decode(),
        base64.b64encode(
            bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880")
        ).decode(),  # high bit set
    ],
)
def test_bad_keys_are_refused(text: str) -> None:
    with pytest.raises(BadKey):
        parse_public_key(text)


@given(st.binary(min_size=32, max_size=32) | st.sampled_from(sorted(_LOW_ORDER)))
def test_a_32_byte_key_is_refused_exactly_when_low_order(raw: bytes) -> None:
    text = base64.b64encode(raw).decode()
    low_order = raw in _LOW_ORDER or (raw[:31] + bytes([raw[31] & 0x7F])) in _LOW_ORDER
    if low_order:
        with pytest.raises(BadKey):
            parse_public_key(text)
    else:
        assert parse_public_key(text) == text


def test_non_string_is_refused() -> None:
    with pytest.raises(BadKey):
        parse_public_key(123)  # type: ignore[arg-type]

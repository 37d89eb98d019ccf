"""The relay's TCP stream codec: frames round-trip, split anywhere, and bad input is named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.streamwire import (
    MAX_PAYLOAD,
    PREAMBLE,
    BadPreamble,
    Datagram,
    EmptyFrame,
    Frame,
    FrameTooLarge,
    Refusal,
    StreamDecoder,
    StreamError,
    UnknownFrameKind,
    build_frame,
    parse_frame,
)

datagrams = st.builds(
    Datagram,
    st.integers(1, 65535),
    st.binary(min_size=1, max_size=MAX_PAYLOAD),
)
refusals = st.builds(Refusal, st.text(alphabet=st.characters(codec="ascii"), max_size=150))


def test_a_datagram_frame_is_three_header_bytes_and_the_payload() -> None:
    frame = build_frame(Datagram(40001, b"\x04\x00\x00\x00abcd"))
    assert frame == b"\x00\x0b\x01\x9c\x41" + b"\x04\x00\x00\x00abcd"
    assert parse_frame(frame) == Datagram(40001, b"\x04\x00\x00\x00abcd")


def test_a_refusal_is_one_line() -> None:
    frame = build_frame(Refusal("too many\nconnections\r\n from here"))
    assert parse_frame(frame) == Refusal("too many connections from here")


@given(st.lists(datagrams | refusals, max_size=8), st.data())
def test_frames_survive_any_split_of_the_stream(frames: list[Frame], data: st.DataObject) -> None:
    stream = PREAMBLE + b"".join(build_frame(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder, out = StreamDecoder(preamble=True), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
    expected = [
        Refusal(" ".join(f.reason.split()) or "refused") if isinstance(f, Refusal) else f
        for f in frames
    ]
    assert out == expected
    assert decoder.buffered == 0


@given(st.binary(max_size=64))
def test_random_bytes_give_frames_or_a_named_error(data: bytes) -> None:
    decoder = StreamDecoder(preamble=False)
    try:
        frames = decoder.feed(data)
    except StreamError as exc:
        assert exc.code in {"empty_frame", "frame_too_large", "unknown_frame_kind"}
        with pytest.raises(StreamError):  # a failed stream stays failed
            decoder.feed(b"")
    else:
        assert all(isinstance(f, Datagram | Refusal) for f in frames)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET / HTTP/1.1\r\n", BadPreamble),
        (b"WGTS\x02", BadPreamble),
        (b"\x16\x03\x01", BadPreamble),  # a TLS ClientHello inside the tunnel
    ],
)
def test_a_stream_that_is_not_ours_is_refused_at_once(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error, match="not a wiregate relay stream"):
        StreamDecoder(preamble=True).feed(data)


def test_a_partial_preamble_waits() -> None:
    decoder = StreamDecoder(preamble=True)
    assert decoder.feed(b"WG") == []
    assert decoder.feed(b"TS\x01" + build_frame(Datagram(1, b"x"))) == [Datagram(1, b"x")]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x00\x02\x01\x00", EmptyFrame),  # shorter than its own header
        (b"\x00\x03\x01\x00\x05", EmptyFrame),  # a datagram with no payload
        (b"\x00\x04\x01\x00\x00x", EmptyFrame),  # port 0
        ((MAX_PAYLOAD + 4).to_bytes(2, "big") + b"\x01", FrameTooLarge),  # refused before read
        (b"\x00\x04\x09\x00\x01x", UnknownFrameKind),
    ],
)
def test_malformed_frames_are_named(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        StreamDecoder(preamble=False).feed(data)


@pytest.mark.parametrize(
    "frame", [Datagram(1, b""), Datagram(0, b"x"), Datagram(1, bytes(MAX_PAYLOAD + 1))]
)
def test_what_cannot_be_encoded_is_refused(frame: Datagram) -> None:
    with pytest.raises(ValueError):
        build_frame(frame)


def test_parse_frame_wants_exactly_one() -> None:
    one = build_frame(Datagram(7, b"a"))
    with pytest.raises(EmptyFrame):
        parse_frame(one + one)
    with pytest.raises(EmptyFrame):
        parse_frame(one[:-1])

"""The relay's TCP/TLS stream: datagrams framed on a byte stream (sans-IO codec).

Where a network lets only TCP 443 out, an agent carries its WireGuard datagrams
(and the relay's control messages) over TLS to the relay. After the TLS
handshake the client writes :data:`PREAMBLE` (``b"WGTS"`` and version 1); then
both sides write frames::

    frame := length u16 | kind u8 | port u16 | payload        (big-endian)

``length`` counts the bytes after itself (kind, port and payload), so a frame is
``2 + length`` bytes. Kinds:

    DATAGRAM  port = the relay UDP port the datagram is for (client -> relay) or
              came from (relay -> client): the control port or an allocation's port;
              payload = the datagram, 1..MAX_PAYLOAD bytes
    REFUSED   port = 0; payload = why, one line of UTF-8; the sender then closes

Length-prefixed frames rather than WebSocket: both ends are wiregate, the
framing costs three bytes and no masking pass over every datagram (WebSocket
clients must XOR-mask each payload), and TLS on 443 already looks like HTTPS to
a firewall that only checks the port or the TLS handshake.

:class:`StreamDecoder` takes bytes as they arrive and returns whole frames;
every malformed input raises a :class:`StreamError` subclass naming it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from wiregate.errors import BadInput

__all__ = [
    "MAX_PAYLOAD",
    "PREAMBLE",
    "BadPreamble",
    "Datagram",
    "EmptyFrame",
    "Frame",
    "FrameKind",
    "FrameTooLarge",
    "Refusal",
    "StreamDecoder",
    "StreamError",
    "UnknownFrameKind",
    "build_frame",
    "parse_frame",
]

PREAMBLE = b"WGTS\x01"
MAX_PAYLOAD = 4096  # a WireGuard datagram (<= max_datagram) or a control message with a ticket
MAX_REASON = 200
_HEAD = struct.Struct("!HBH")
_LENGTH = 2


class StreamError(BadInput):
    """A byte stream that is not a valid wiregate relay stream."""

    code = "bad_stream"


class BadPreamble(StreamError):
    """The stream did not start with :data:`PREAMBLE`."""

    code = "bad_preamble"


class FrameTooLarge(StreamError):
    """A frame's length field exceeds what any frame may carry."""

    code = "frame_too_large"


class EmptyFrame(StreamError):
    """A frame too short for its header, or a datagram frame with no payload."""

    code = "empty_frame"


class UnknownFrameKind(StreamError):
    """A frame of a kind this version does not know."""

    code = "unknown_frame_kind"


class FrameKind(IntEnum):
    """The frame kinds."""

    DATAGRAM = 1
    REFUSED = 2


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP datagram for (or from) the relay's UDP ``port``."""

    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """The sender refuses the stream (one line) and closes it."""

    reason: str


Frame = Datagram | Refusal


def build_frame(frame: Frame) -> bytes:
    """Encode one frame; ValueError if it cannot be encoded."""
    if isinstance(frame, Datagram):
        if not 1 <= len(frame.data) <= MAX_PAYLOAD:
            raise ValueError(f"a datagram frame carries 1..{MAX_PAYLOAD} bytes")
        if not 0 < frame.port < 65536:
            raise ValueError("a datagram frame's port is 1..65535")
        return _HEAD.pack(len(frame.data) + 3, FrameKind.DATAGRAM, frame.port) + frame.data
    text = _one_line(frame.reason).encode()[:MAX_REASON]
    return _HEAD.pack(len(text) + 3, FrameKind.REFUSED, 0) + text


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "refused"


def parse_frame(data: bytes) -> Frame:
    """Decode exactly one whole frame (length field included)."""
    frames = StreamDecoder(preamble=False).feed(data)
    if len(frames) != 1:
        raise EmptyFrame("expected exactly one whole frame")
    return frames[0]


class StreamDecoder:
    """Bytes in, whole frames out; ``preamble``: the stream starts with :data:`PREAMBLE`.

    After a :class:`StreamError` the decoder is spent: the stream must be closed.
    """

    def __init__(self, *, preamble: bool) -> None:
        self._buffer = bytearray()
        self._preamble = preamble
        self._broken = False

    @property
    def awaiting_preamble(self) -> bool:
        """Whether the preamble has yet to arrive (whole)."""
        return self._preamble

    @property
    def buffered(self) -> int:
        """Bytes received that do not form a whole frame yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame that ``data`` completes, in order."""
        if self._broken:
            raise StreamError("the stream already failed")
        self._buffer += data
        try:
            if self._preamble and not self._take_preamble():
                return []
            return self._frames()
        except StreamError:
            self._broken = True
            raise

    def _take_preamble(self) -> bool:
        have = bytes(self._buffer[: len(PREAMBLE)])
        if have != PREAMBLE[: len(have)]:
            raise BadPreamble("not a wiregate relay stream (expected WGTS version 1)")
        if len(have) < len(PREAMBLE):
            return False
        del self._buffer[: len(PREAMBLE)]
        self._preamble = False
        return True

    def _frames(self) -> list[Frame]:
        out: list[Frame] = []
        buf, pos = self._buffer, 0
        while len(buf) - pos >= _LENGTH:
            (length,) = struct.unpack_from("!H", buf, pos)
            if length < 3:
                raise EmptyFrame(f"a frame of length {length} has no room for its header")
            if length > MAX_PAYLOAD + 3:
                raise FrameTooLarge(f"a frame of {length} bytes (at most {MAX_PAYLOAD + 3})")
            end = pos + _LENGTH + length
            if end > len(buf):
                break
            port = int.from_bytes(buf[pos + 3 : pos + 5], "big")
            out.append(_decode(buf[pos + _LENGTH], port, bytes(buf[pos + 5 : end])))
            pos = end
        del buf[:pos]
        return out


def _decode(kind: int, port: int, payload: bytes) -> Frame:
    if kind == FrameKind.DATAGRAM:
        if not payload:
            raise EmptyFrame("a datagram frame with no payload")
        if port == 0:
            raise EmptyFrame("a datagram frame for port 0")
        return Datagram(port, payload)
    if kind == FrameKind.REFUSED:
        return Refusal(payload.decode("utf-8", "replace"))
    raise UnknownFrameKind(f"unknown frame kind {kind}")

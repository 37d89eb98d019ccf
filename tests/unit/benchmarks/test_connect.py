"""The connect benchmark's own arithmetic: its ICMP echo packets and its percentiles."""

from __future__ import annotations

import struct

import pytest

from benchmarks.connect import _checksum, _echo_request, _is_reply, percentile


def test_an_echo_request_carries_a_valid_internet_checksum() -> None:
    packet = _echo_request(0x1234, 7)
    kind, code, _sum, ident, seq = struct.unpack("!BBHHH", packet[:8])
    assert (kind, code, ident, seq) == (8, 0, 0x1234, 7)
    assert _checksum(packet) == 0  # summed with its own checksum, a valid packet gives 0


def _ip_header(length: int = 20) -> bytes:
    return bytes([0x40 | length // 4]) + bytes(length - 1)


def test_only_an_echo_reply_with_our_identifier_counts() -> None:
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x1234, 7)
    assert _is_reply(_ip_header() + reply, 0x1234)
    assert _is_reply(_ip_header(24) + reply, 0x1234)  # IP options: the header is longer
    assert not _is_reply(_ip_header() + reply, 0x4321)  # another prober's
    request = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 7)
    assert not _is_reply(_ip_header() + request, 0x1234)  # our own request, seen raw
    unreachable = struct.pack("!BBHHH", 3, 0, 0, 0x1234, 7)
    assert not _is_reply(_ip_header() + unreachable, 0x1234)
    assert not _is_reply(_ip_header() + reply[:6], 0x1234)  # truncated


def test_percentiles_interpolate_between_order_statistics() -> None:
    samples = [3.0, 1.0, 2.0, 4.0]
    assert percentile(samples, 50) == pytest.approx(2.5)
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 4.0
    assert percentile(samples, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0

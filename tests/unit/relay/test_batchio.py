"""Batched UDP I/O against real sockets on loopback: order, addresses, limits, errors."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from relay.aio.batchio import BatchSocket, decode_sockaddr, encode_sockaddr

Pair = tuple[socket.socket, socket.socket]


def _udp(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    return sock


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    family, host = request.param
    a, b = _udp(family, host), _udp(family, host)
    yield a, b
    a.close()
    b.close()


def _addr(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _drain(batch: BatchSocket, want: int, max_: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
    got: list[tuple[bytes, tuple[str, int]]] = []
    while len(got) < want:
        ready, _, _ = select.select([batch], [], [], 2.0)
        if not ready:
            break
        got.extend(batch.recv_batch(max_))
    return got


def test_nothing_queued_is_an_empty_list(pair: Pair) -> None:
    assert BatchSocket(pair[0]).recv_batch() == []


def test_batch_round_trip_keeps_order_content_and_source(pair: Pair) -> None:
    a, b = pair
    sender, receiver = BatchSocket(a), BatchSocket(b)
    items = [(bytes([i % 256]) * (i + 1), _addr(b)) for i in range(150)]
    assert sender.send_batch(items) == 150
    got = _drain(receiver, 150)
    assert [data for data, _ in got] == [data for data, _ in items]
    assert {src for _, src in got} == {_addr(a)}


def test_recv_batch_returns_at_most_max(pair: Pair) -> None:
    a, b = pair
    for i in range(10):
        a.sendto(bytes([i]), _addr(b))
    receiver = BatchSocket(b)
    select.select([receiver], [], [], 2.0)
    first = receiver.recv_batch(3)
    assert [d for d, _ in first] == [b"\x00", b"\x01", b"\x02"]
    rest = _drain(receiver, 7, max_=100)
    assert [d for d, _ in rest] == [bytes([i]) for i in range(3, 10)]


def test_sources_match_recvfrom_spelling(pair: Pair) -> None:
    a, b = pair
    a.sendto(b"x", _addr(b))
    select.select([b], [], [], 2.0)
    ((data, src),) = BatchSocket(b).recv_batch()
    a.sendto(b"y", _addr(b))
    select.select([b], [], [], 2.0)
    _, raw = b.recvfrom(10)
    assert (data, src) == (b"x", (raw[0], raw[1]))


def test_each_datagram_goes_to_its_own_address() -> None:
    sender = _udp(socket.AF_INET, "127.0.0.1")
    sinks = [_udp(socket.AF_INET, "127.0.0.1") for _ in range(3)]
    try:
        items = [(f"to {i}".encode(), _addr(sinks[i % 3])) for i in range(9)]
        assert BatchSocket(sender).send_batch(items) == 9
        for i, sink in enumerate(sinks):
            got = _drain(BatchSocket(sink), 3)
            assert [d for d, _ in got] == [f"to {j}".encode() for j in range(i, 9, 3)]
    finally:
        for sock in (sender, *sinks):
            sock.close()


def test_ipv4_peer_on_a_dual_stack_socket() -> None:
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", 0))
    server.setblocking(False)
    client = _udp(socket.AF_INET, "127.0.0.1")
    try:
        client.sendto(b"ping", ("127.0.0.1", _addr(server)[1]))
        batch = BatchSocket(server)
        ((data, src),) = _drain(batch, 1)
        assert (data, src) == (b"ping", ("::ffff:127.0.0.1", _addr(client)[1]))
        # Both spellings of the IPv4 peer reach it from the IPv6 socket.
        assert batch.send_batch([(b"a", src), (b"b", ("127.0.0.1", src[1]))]) == 2
        assert [d for d, _ in _drain(BatchSocket(client), 2)] == [b"a", b"b"]
    finally:
        server.close()
        client.close()


def test_longer_than_bufsize_is_dropped_and_counted(pair: Pair) -> None:
    a, b = pair
    receiver = BatchSocket(b, bufsize=100)
    a.sendto(b"x" * 101, _addr(b))
    a.sendto(b"y" * 100, _addr(b))
    got = _drain(receiver, 1)
    assert [d for d, _ in got] == [b"y" * 100]
    assert receiver.truncated == 1
    # A socket with the default size on the same thread still reads whole datagrams.
    a.sendto(b"z" * 9000, _addr(b))
    assert [d for d, _ in _drain(BatchSocket(b), 1)] == [b"z" * 9000]


def test_a_refused_datagram_is_skipped_and_the_rest_go(pair: Pair) -> None:
    a, b = pair
    family = a.family
    # Port 0 is never a valid destination: the kernel refuses that one datagram.
    bad = ("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0)
    items = [(b"1", _addr(b)), (b"2", bad), (b"3", _addr(b))]
    assert BatchSocket(a).send_batch(items) == 2
    assert [d for d, _ in _drain(BatchSocket(b), 2)] == [b"1", b"3"]


def test_bad_destination_raises_and_sends_nothing(pair: Pair) -> None:
    a, b = pair
    batch = BatchSocket(a)
    with pytest.raises(ValueError, match="not an I"):
        batch.send_batch([(b"1", _addr(b)), (b"2", ("example.com", 1))])
    with pytest.raises(ValueError, match="out of range"):
        batch.send_batch([(b"1", (_addr(b)[0], 70000))])
    batch.send_batch([(b"marker", _addr(b))])
    assert [d for d, _ in _drain(BatchSocket(b), 1)] == [b"marker"]


def test_ipv6_destination_on_an_ipv4_socket_is_refused() -> None:
    sock = _udp(socket.AF_INET, "127.0.0.1")
    try:
        with pytest.raises(ValueError, match="not an IPv4 address"):
            BatchSocket(sock).send_batch([(b"x", ("::1", 9))])
    finally:
        sock.close()


def test_only_udp_ip_sockets() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        pytest.raises(ValueError, match="SOCK_DGRAM"),
    ):
        BatchSocket(tcp)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix,
        pytest.raises(ValueError, match="AF_INET"),
    ):
        BatchSocket(unix)


def test_limits_are_checked(pair: Pair) -> None:
    with pytest.raises(ValueError, match="max"):
        BatchSocket(pair[0]).recv_batch(0)
    with pytest.raises(ValueError, match="bufsize"):
        BatchSocket(pair[0], bufsize=0)
    assert BatchSocket(pair[0]).send_batch([]) == 0


def test_closed_socket_raises_oserror(pair: Pair) -> None:
    batch = BatchSocket(pair[0])
    pair[0].close()
    with pytest.raises(OSError):
        batch.recv_batch()


def test_fileno_is_the_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert BatchSocket(sock).fileno() == sock.fileno()


@pytest.mark.parametrize(
    ("addr", "v6", "length"),
    [
        (("192.0.2.1", 51820), False, 16),
        (("2001:db8::1", 443), True, 28),
        (("fe80::1%1", 5), True, 28),
        (("::ffff:192.0.2.1", 7), True, 28),
    ],
)
def test_socket_address_codec_round_trips(addr: tuple[str, int], v6: bool, length: int) -> None:
    raw, size = encode_sockaddr(addr, v6=v6)
    assert size == length
    host, port = decode_sockaddr(raw[:size])
    assert port == addr[1]
    assert host.partition("%")[0] == addr[0].partition("%")[0]
    assert ("%" in host) == ("%" in addr[0])


def test_one_batch_from_many_sources_names_each_source() -> None:
    receiver = _udp(socket.AF_INET, "127.0.0.1")
    senders = [_udp(socket.AF_INET, "127.0.0.1") for _ in range(4)]
    try:
        for round_ in range(3):
            for i, sender in enumerate(senders):
                sender.sendto(f"{round_}:{i}".encode(), _addr(receiver))
        got = _drain(BatchSocket(receiver), 12)
        assert [(d.decode(), src) for d, src in got] == [
            (f"{r}:{i}", _addr(s)) for r in range(3) for i, s in enumerate(senders)
        ]
    finally:
        for sock in (receiver, *senders):
            sock.close()

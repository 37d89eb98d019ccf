"""Fuzzing the relay core and the control codec: arbitrary datagrams on every port.

Properties: nothing raises; every send is either a reply to the sender, from
the port it wrote to and no larger than what it sent (no amplification), or the
unchanged datagram forwarded from one bound address to the other bound address;
nothing is ever sent to a forbidden address; every outcome is a declared label.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.relay_fixtures import CONTROL, Lab, make_lab, node, pair_tickets, signer
from relay.client.bind import build_allocate, build_bind, build_confirm, build_ping, parse_pong
from relay.controlwire import MAGIC, Ping, Pong, build_control, parse_control
from relay.errors import ControlError
from relay.filters import destination_refusal, normalize_ip
from relay.forwarding import OUTCOMES

KEY, TRUSTED = signer()
A, B = node("dev-a"), node("dev-b")
ADDR_A, ADDR_B = ("198.51.100.1", 51820), ("203.0.113.7", 40001)
FOR_A, FOR_B = pair_tickets(KEY, A, B)

SOURCES = [
    ADDR_A,
    ADDR_B,
    ("198.51.100.1", 51821),
    ("192.0.2.66", 5555),
    ("127.0.0.1", 51820),
    ("::ffff:127.0.0.1", 51820),
    ("169.254.169.254", 80),
    ("ff02::1", 1),
    ("2001:db8::1", 4000),
    ("fe80::1%eth0", 51820),
    ("not-an-address", 1),
    ("", 0),
]


def bound_lab() -> tuple[Lab, int, int]:
    lab = make_lab([TRUSTED])
    return lab, lab.bind(FOR_A, ADDR_A), lab.bind(FOR_B, ADDR_B)


def seeds(port_a: int) -> list[bytes]:
    return [
        build_allocate(FOR_A),
        build_bind(FOR_A),
        build_confirm(FOR_A, bytes(16)),
        b"\x01\x00\x00\x00" + bytes(144),
        b"\x04\x00\x00\x00" + bytes(28),
        MAGIC + b"\x01\x07" + bytes(17),
        build_ping(bytes(16)),
        build_control(Pong(bytes(16), 1, 2)),
    ]


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        if buf:
            buf[position % len(buf)] = value
    return bytes(buf[: len(buf) - cut % (len(buf) + 1)])


wireguard_shaped = st.builds(
    lambda kind, n, fill: bytes([kind, 0, 0, 0]) + fill * n,
    st.sampled_from([1, 2, 3, 4]),
    st.sampled_from([28, 44, 60, 88, 144, 1404]),
    st.binary(min_size=1, max_size=1),
)
datagram = st.one_of(
    st.binary(max_size=1600),
    wireguard_shaped,
    st.builds(lambda tail: MAGIC + tail, st.binary(max_size=600)),
    st.tuples(
        st.integers(0, 7),
        st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255))),
        st.integers(0, 50),
    ),
)

source = st.one_of(st.sampled_from([ADDR_A, ADDR_B]), st.sampled_from(SOURCES))


def check(lab: Lab, data: bytes, src: tuple[str, int], port: int, before: set) -> None:
    for send in lab.relay.handle(data, src, port, lab.now):
        is_reply = send.dst == src and send.local_port == port
        if is_reply:
            assert len(send.data) <= len(data)
        else:  # a forward: same bytes, bound sender, bound receiver
            assert send.data == data and send.dst in before and src in before
        dst = normalize_ip(send.dst[0])
        assert destination_refusal(dst) is None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(datagram, source, st.integers(0, 4), st.floats(0, 30)),
        max_size=12,
    )
)
def test_arbitrary_datagrams_on_every_port(steps: list) -> None:
    lab, port_a, port_b = bound_lab()
    ports = [port_a, port_b, CONTROL, port_a + 2, 1]
    for raw, src, which, dt in steps:
        data = raw if isinstance(raw, bytes) else mutate(seeds(port_a)[raw[0]], raw[1], raw[2])
        lab.now += dt
        bound = {addr for view in lab.relay.allocations() for addr in view.bound if addr}
        check(lab, data, src, ports[which], bound)
    assert set(lab.relay.counters) <= set(OUTCOMES)


def round_trips_or_refuses(data: bytes) -> None:
    try:
        msg = parse_control(data)
    except ControlError:
        return
    assert parse_control(build_control(msg)) == msg


@given(st.binary(max_size=700))
def test_control_codec_raises_only_control_errors(data: bytes) -> None:
    round_trips_or_refuses(data)


@given(st.integers(0, 9), st.binary(max_size=500))
def test_control_codec_with_the_magic_prefix(kind: int, tail: bytes) -> None:
    round_trips_or_refuses(MAGIC + bytes([1, kind]) + tail)


nonces = st.binary(min_size=16, max_size=16)
u32 = st.integers(0, 2**32 - 1)


@given(nonces, u32, u32)
def test_ping_and_pong_round_trip_and_pong_never_outgrows_ping(
    nonce: bytes, allocations: int, capacity: int
) -> None:
    ping, pong = build_ping(nonce), build_control(Pong(nonce, allocations, capacity))
    assert parse_control(ping) == Ping(nonce)
    assert parse_pong(pong, nonce) == Pong(nonce, allocations, capacity)
    assert len(pong) <= len(ping)


@settings(max_examples=300)
@given(nonces, st.binary(max_size=60), source)
def test_every_pong_answers_its_own_ping(nonce: bytes, noise: bytes, src: tuple) -> None:
    """PINGs, corrupted PINGs and noise: a reply only ever carries the sender's nonce."""
    lab = make_lab([TRUSTED])
    for data in (build_ping(nonce), build_ping(nonce)[:-1] + noise, MAGIC + b"\x01\x08" + noise):
        for send in lab.relay.handle(data, src, CONTROL, lab.now):
            ping = parse_control(data)
            assert isinstance(ping, Ping) and send.dst == src and len(send.data) <= len(data)
            assert parse_control(send.data) == Pong(ping.nonce, 0, 8)
            assert destination_refusal(normalize_ip(send.dst[0])) is None
    assert set(lab.relay.counters) <= set(OUTCOMES)

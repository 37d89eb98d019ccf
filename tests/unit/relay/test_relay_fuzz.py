"""Fuzzing the relay: its core on arbitrary datagrams, its control codec and its tickets.

The core, fed arbitrary datagrams on every port: nothing raises; every send is
either a reply to the sender, from the port it wrote to and no larger than what
it sent (no amplification), or the unchanged datagram forwarded from one bound
address to the other bound address; nothing is ever sent to a forbidden address;
every outcome is a declared label.

The control codec: parse -> build of arbitrary bytes, and build -> parse for
every control kind with generated fields. Tickets: sign -> parse for generated
claims (any UTF-8 text the format carries, either side, any time inside the
lifetime); tickets truncated, extended, spliced or corrupted are refused with a
:class:`TicketError` and never read as different claims
(tests/unit/relay/test_tickets.py feeds tickets random bytes and single-byte changes).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from lab.relay_fixtures import (
    CONTROL,
    NOW,
    RELAY_ID,
    TENANT,
    Lab,
    make_lab,
    node,
    pair_tickets,
    signer,
    ticket,
)
from relay.client.bind import build_allocate, build_bind, build_confirm, build_ping, parse_pong
from relay.controlwire import (
    MAGIC,
    NONCE_SIZE,
    REASONS,
    Allocate,
    Allocated,
    Bind,
    Bound,
    Challenge,
    Confirm,
    Ping,
    Pong,
    Refused,
    build_control,
    parse_control,
)
from relay.errors import ControlError, TicketError, UnknownSigner
from relay.filters import destination_refusal, normalize_ip
from relay.forwarding import OUTCOMES
from relay.tickets import (
    MAX_LIFETIME,
    MAX_TICKET_SIZE,
    Node,
    Side,
    Ticket,
    TrustedSigner,
    parse_ticket,
    sign_ticket,
    ticket_id_of,
)
from wiregate.keys import encode_key

KEY, TRUSTED = signer()
A, B = node("dev-a"), node("dev-b")
ADDR_A, ADDR_B = ("198.51.100.1", 51820), ("203.0.113.7", 40001)
FOR_A, FOR_B = pair_tickets(KEY, A, B)
VALID = ticket(KEY, A, B)
OTHER = ticket(KEY, B, A, side=Side.B)

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


# --- control messages of every kind ---------------------------------------------


ids = st.binary(min_size=16, max_size=16)
ticket_bytes = st.binary(min_size=1, max_size=MAX_TICKET_SIZE)
u16 = st.integers(0, 0xFFFF)
control_messages = st.one_of(
    st.builds(Allocate, ticket_bytes),
    st.builds(Allocated, ids, u16),
    st.builds(Bind, ticket_bytes),
    st.builds(Challenge, ids, ids),
    st.builds(Confirm, ids, ticket_bytes),
    st.builds(Bound, ids, st.booleans()),
    st.builds(Refused, ids, st.sampled_from(REASONS)),
    st.builds(Ping, st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)),
    st.builds(Pong, st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE), u32, u32),
)


@given(control_messages)
def test_every_control_kind_round_trips(msg: object) -> None:
    data = build_control(msg)  # type: ignore[arg-type]
    assert data.startswith(MAGIC + b"\x01")
    assert parse_control(data) == msg


@given(control_messages, st.integers(1, 40))
def test_truncated_fixed_size_control_messages_are_refused(msg: object, cut: int) -> None:
    data = build_control(msg)  # type: ignore[arg-type]
    short = data[: max(0, len(data) - cut)]
    try:
        parsed = parse_control(short)
    except ControlError:
        return
    # only the variable-length kinds (a ticket, a ticket after a cookie) survive a cut
    assert isinstance(parsed, Allocate | Bind | Confirm)


@given(ids, st.integers(len(REASONS), 255))
def test_unknown_refusal_codes_read_as_unknown(ticket_id: bytes, code: int) -> None:
    data = MAGIC + bytes([1, 7]) + ticket_id + bytes([code])
    assert parse_control(data) == Refused(ticket_id, "unknown")


# --- tickets -------------------------------------------------------------------------


def field_text(max_bytes: int = 64) -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=max_bytes).filter(
        lambda s: 1 <= len(s.encode()) <= max_bytes
    )


public_keys = st.binary(min_size=32, max_size=32).map(
    lambda seed: encode_key(bytes(PrivateKey(seed).public_key))
)
nodes = st.builds(Node, field_text(), public_keys)


@st.composite
def tickets(draw: st.DrawFn) -> Ticket:
    node_a = draw(nodes)
    node_b = draw(nodes.filter(lambda n: n.device_id != node_a.device_id))
    issued = draw(st.integers(int(NOW) - MAX_LIFETIME + 1, int(NOW)))
    lifetime = draw(st.integers(int(NOW) - issued + 1, MAX_LIFETIME))
    return Ticket(
        draw(ids),
        RELAY_ID,
        draw(field_text()),
        node_a,
        node_b,
        draw(st.sampled_from(Side)),
        issued,
        issued + lifetime,
    )


@given(tickets())
def test_signed_tickets_parse_to_their_claims(claims: Ticket) -> None:
    if claims.node_a.public_key == claims.node_b.public_key:
        return  # the same seed twice: a pair of one node, which the format refuses
    data = sign_ticket(claims, KEY)
    trusted = TrustedSigner(TRUSTED.verify_key, frozenset({claims.tenant}))
    assert len(data) <= MAX_TICKET_SIZE
    assert ticket_id_of(data) == claims.ticket_id
    assert parse_ticket(data, [trusted], NOW, relay_id=RELAY_ID) == claims


def parse(data: bytes) -> Ticket:
    return parse_ticket(data, [TRUSTED], NOW, relay_id=RELAY_ID)


def refused_or_same(data: bytes) -> None:
    try:
        parse(data)
    except TicketError:
        return
    assert data in (VALID, OTHER), "damaged ticket accepted"


@given(st.integers(0, len(VALID)), st.binary(max_size=MAX_TICKET_SIZE))
def test_cut_and_extended_tickets_are_refused(cut: int, tail: bytes) -> None:
    refused_or_same(VALID[:cut] + tail)


@given(st.integers(0, len(VALID)), st.integers(0, len(VALID)))
def test_tickets_spliced_with_another_signed_ticket_are_refused(left: int, right: int) -> None:
    refused_or_same(VALID[:left] + OTHER[right:])


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=8))
def test_tickets_with_several_corrupted_bytes_are_refused(edits: list[tuple[int, int]]) -> None:
    buf = bytearray(VALID)
    for where, xor in edits:
        buf[where % len(buf)] ^= xor
    refused_or_same(bytes(buf))


@given(tickets())
def test_a_ticket_from_an_untrusted_signer_is_refused(claims: Ticket) -> None:
    if claims.node_a.public_key == claims.node_b.public_key:
        return
    data = sign_ticket(claims, SigningKey.generate())
    try:
        parse(data)
    except UnknownSigner:
        return
    raise AssertionError("a ticket of an untrusted signer was accepted")


def test_the_valid_ticket_parses() -> None:
    """The refusal properties above compare against it: it must parse."""
    assert parse(VALID).tenant == TENANT

"""Relay tickets and control framing: generated messages round-trip, damaged ones are refused.

tests/unit/relay/test_relay_fuzz.py fuzzes the relay core and parse -> build of the
control codec; tests/unit/relay/test_tickets.py feeds tickets random bytes and
single-byte changes. Here: build -> parse for every control kind with
generated fields; sign -> parse for generated ticket claims (any UTF-8 text
the format carries, either side, any time inside the lifetime); and tickets
truncated, extended, spliced or corrupted are refused with a
:class:`TicketError` and never read as different claims.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from lab.relay_fixtures import NOW, RELAY_ID, TENANT, node, signer, ticket
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
VALID = ticket(KEY, A, B)
OTHER = ticket(KEY, B, A, side=Side.B)

ids = st.binary(min_size=16, max_size=16)
ticket_bytes = st.binary(min_size=1, max_size=MAX_TICKET_SIZE)
u16, u32 = st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
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

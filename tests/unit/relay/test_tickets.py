"""Relay tickets: signing, verification and every named refusal."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from lab.relay_fixtures import NOW, RELAY_ID, TENANT, node, signer, ticket
from relay.errors import (
    BadTicketSignature,
    ExpiredTicket,
    MalformedTicket,
    NoTrustedSigners,
    TicketError,
    TicketNotYetValid,
    UnknownSigner,
    WrongRelay,
    WrongTenant,
)
from relay.tickets import (
    MAX_TICKET_SIZE,
    Node,
    Side,
    Ticket,
    issue_pair,
    parse_ticket,
    sign_ticket,
    ticket_id_of,
)

KEY, TRUSTED = signer()
A, B = node("dev-a"), node("dev-b")


def parse(data: bytes, now: float = NOW, keys: list = [TRUSTED]) -> Ticket:  # noqa: B006
    return parse_ticket(data, keys, now, relay_id=RELAY_ID)


def test_round_trip() -> None:
    t = Ticket(os.urandom(16), RELAY_ID, TENANT, A, B, Side.B, int(NOW), int(NOW) + 120)
    data = sign_ticket(t, KEY)
    assert parse(data) == t
    assert ticket_id_of(data) == t.ticket_id
    assert t.own == B and t.peer == A
    assert len(data) <= MAX_TICKET_SIZE


def test_issue_pair_gives_both_sides_of_the_same_pair() -> None:
    for_a, for_b = issue_pair(KEY, relay_id=RELAY_ID, tenant=TENANT, node_a=A, node_b=B, now=NOW)
    ta, tb = parse(for_a), parse(for_b)
    assert (ta.side, tb.side) == (Side.A, Side.B)
    assert ta.pair == tb.pair and ta.ticket_id != tb.ticket_id
    assert ta.pair_index != tb.pair_index
    assert ta.expires_at - ta.issued_at == 120


def test_pair_is_independent_of_the_order_nodes_are_named_in() -> None:
    one = parse(ticket(KEY, A, B, Side.A))
    other = parse(ticket(KEY, B, A, Side.B))
    assert one.pair == other.pair and one.pair_index == other.pair_index


def test_largest_ticket_fits_the_bound() -> None:
    long = "x" * 64
    t = Ticket(os.urandom(16), long, long, replace(A, device_id=long), B, Side.A, 1, 121)
    t = replace(t, node_b=replace(B, device_id="y" * 64))
    assert len(sign_ticket(t, KEY)) == MAX_TICKET_SIZE


def test_no_verify_keys_fails_closed() -> None:
    with pytest.raises(NoTrustedSigners):
        parse(ticket(KEY, A, B), keys=[])


@pytest.mark.parametrize(
    ("now", "error"),
    [
        (NOW + 125, ExpiredTicket),  # 120 s lifetime + 5 s skew
        (NOW - 6, TicketNotYetValid),
    ],
)
def test_validity_window(now: float, error: type[TicketError]) -> None:
    data = ticket(KEY, A, B)
    with pytest.raises(error):
        parse(data, now=now)
    assert parse(data, now=NOW + 124).ticket_id == ticket_id_of(data)


def test_forged_signature() -> None:
    data = bytearray(ticket(KEY, A, B))
    data[-1] ^= 1
    with pytest.raises(BadTicketSignature):
        parse(bytes(data))


def test_tampered_claim_breaks_the_signature() -> None:
    data = bytearray(ticket(KEY, A, B, Side.A))
    data[1] = Side.B  # claim the other side
    with pytest.raises(BadTicketSignature):
        parse(bytes(data))


def test_signed_by_an_untrusted_key() -> None:
    with pytest.raises(UnknownSigner):
        parse(ticket(SigningKey.generate(), A, B))


def test_signature_by_another_key_under_a_trusted_signer_id() -> None:
    """A forger who copies a trusted signer id still needs that signer's key."""
    forged = bytearray(ticket(SigningKey.generate(), A, B))
    genuine = ticket(KEY, A, B)
    forged[34:42] = genuine[34:42]
    with pytest.raises(BadTicketSignature):
        parse(bytes(forged))


def test_cross_tenant_ticket() -> None:
    """A gateway trusted for tenant acme cannot admit nodes of tenant globex."""
    with pytest.raises(WrongTenant):
        parse(ticket(KEY, A, B, tenant="globex"))
    globex_key, globex = signer(("globex",))
    with pytest.raises(WrongTenant):
        parse(ticket(globex_key, A, B), keys=[TRUSTED, globex])


def test_wrong_relay() -> None:
    with pytest.raises(WrongRelay):
        parse(ticket(KEY, A, B, relay_id="relay-2"))


def test_overlong_lifetime_is_refused() -> None:
    with pytest.raises(MalformedTicket):
        parse(ticket(KEY, A, B, lifetime=3600))


def test_a_pair_of_one_node_is_refused() -> None:
    with pytest.raises(MalformedTicket):
        parse(ticket(KEY, A, Node("dev-c", A.public_key)))


def test_signing_refuses_a_bad_key_or_field() -> None:
    t = Ticket(os.urandom(16), RELAY_ID, TENANT, A, Node("z", "A" * 44), Side.A, 1, 2)
    with pytest.raises(ValueError):
        sign_ticket(t, KEY)
    with pytest.raises(ValueError):
        sign_ticket(replace(t, node_b=B, tenant=""), KEY)


@pytest.mark.parametrize("cut", [0, 1, 40, 100])
def test_truncated(cut: int) -> None:
    data = ticket(KEY, A, B)
    with pytest.raises(TicketError):
        parse(data[:cut])


def test_oversized() -> None:
    with pytest.raises(MalformedTicket):
        parse(ticket(KEY, A, B) + bytes(MAX_TICKET_SIZE))


@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_ticket_errors(data: bytes) -> None:
    with pytest.raises(TicketError):
        parse(data)


@given(st.integers(0, 10_000), st.integers(0, 255))
def test_any_single_byte_change_is_refused(position: int, value: int) -> None:
    data = bytearray(ticket(KEY, A, B))
    position %= len(data)
    if data[position] == value:
        return
    data[position] = value
    with pytest.raises(TicketError):
        parse(bytes(data))

"""The sans-IO relay core: admission, return routability, forwarding, quotas, expiry.

Each SECURITY.md "Relay" line has tests here; every reply the core makes is
checked by ``Lab.send`` to be no larger than the datagram that caused it.
"""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from lab.relay_fixtures import (
    CONTROL,
    NOW,
    Lab,
    initiation,
    make_lab,
    node,
    pair_tickets,
    refusal,
    response,
    signer,
    ticket,
    transport,
)
from relay.client.bind import build_allocate, build_bind, build_confirm
from relay.controlwire import Challenge, parse_control
from relay.forwarding import OUTCOMES, Send
from relay.tickets import Side

KEY, TRUSTED = signer()
A, B, C, D = node("dev-a"), node("dev-b"), node("dev-c"), node("dev-d")
ADDR_A, ADDR_B = ("198.51.100.1", 51820), ("203.0.113.7", 40001)
ATTACKER = ("192.0.2.66", 5555)


@pytest.fixture
def lab() -> Lab:
    return make_lab([TRUSTED], own_addresses=("192.0.2.1",))


def bound_pair(lab: Lab) -> tuple[int, int]:
    """A and B bound through the full handshake: ``(port_a, port_b)``."""
    for_a, for_b = pair_tickets(KEY, A, B)
    return lab.bind(for_a, ADDR_A), lab.bind(for_b, ADDR_B)


def test_both_sides_bind_and_wireguard_flows_both_ways(lab: Lab) -> None:
    for_a, for_b = pair_tickets(KEY, A, B)
    port_a, port_b = lab.allocate(for_a, ADDR_A), lab.allocate(for_b, ADDR_B)
    assert port_a != port_b and CONTROL not in (port_a, port_b)
    assert lab.allocate(for_a, ADDR_A) == port_a  # idempotent, nothing consumed yet
    assert lab.confirm(for_a, lab.challenge(for_a, ADDR_A, port_a), ADDR_A, port_a) is False
    assert lab.confirm(for_b, lab.challenge(for_b, ADDR_B, port_b), ADDR_B, port_b) is True
    hello, reply, data = initiation(B), response(A), transport(1424)
    assert lab.send(hello, ADDR_A, port_a) == [Send(ADDR_B, port_b, hello)]
    assert lab.send(reply, ADDR_B, port_b) == [Send(ADDR_A, port_a, reply)]
    assert lab.send(data, ADDR_A, port_a) == [Send(ADDR_B, port_b, data)]
    cookie_reply = b"\x03\x00\x00\x00" + bytes(60)
    assert lab.send(cookie_reply, ADDR_B, port_b) == [Send(ADDR_A, port_a, cookie_reply)]
    assert lab.relay.counters["forwarded"] == 4


def test_retransmitted_confirm_is_answered_again(lab: Lab) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ADDR_A)
    cookie = lab.challenge(for_a, ADDR_A, port)
    assert lab.confirm(for_a, cookie, ADDR_A, port) is False
    assert lab.confirm(for_a, cookie, ADDR_A, port) is False
    assert lab.relay.counters["ticket_replayed"] == 0


# --- tickets: missing, expired, replayed, forged, cross-tenant, bound to the pair ---------


@pytest.mark.parametrize("body", [b"WGRL\x01\x01", b"WGRL\x01\x03", b"", b"WGRL"])
def test_missing_ticket_gets_nothing(lab: Lab, body: bytes) -> None:
    assert lab.send(body, ADDR_A, CONTROL) == []
    assert lab.relay.counters["malformed_control"] == 1


def test_unbound_sources_are_not_forwarded(lab: Lab) -> None:
    port_a, _ = bound_pair(lab)
    assert lab.send(transport(), ATTACKER, port_a) == []
    assert lab.send(transport(), ADDR_A, port_a + 100) == []
    assert lab.relay.counters["unbound_source"] == 1
    assert lab.relay.counters["no_allocation"] == 1


def test_expired_ticket_is_refused_at_every_step(lab: Lab) -> None:
    short = ticket(KEY, A, B, lifetime=10)
    port = lab.allocate(short, ADDR_A)
    cookie = lab.challenge(short, ADDR_A, port)
    lab.now = NOW + 16  # past expiry + skew, cookie still in its window
    assert refusal(lab.send(build_confirm(short, cookie), ADDR_A, port)) == "ticket_expired"
    assert refusal(lab.send(build_bind(short), ADDR_A, port)) == "ticket_expired"
    assert refusal(lab.send(build_allocate(short), ADDR_A, CONTROL)) == "ticket_expired"
    assert lab.relay.allocations()[0].bound == (None, None)


def test_replayed_ticket_is_refused(lab: Lab) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.bind(for_a, ADDR_A)
    assert refusal(lab.send(build_bind(for_a), ATTACKER, port)) == "ticket_replayed"
    assert refusal(lab.send(build_allocate(for_a), ATTACKER, CONTROL)) == "ticket_replayed"
    lab.now += 70  # the allocation idles out, the replay entry lives until the ticket expires
    lab.relay.expire(lab.now)
    assert refusal(lab.send(build_allocate(for_a), ADDR_A, CONTROL)) == "ticket_replayed"


def test_a_stolen_ticket_racing_the_owner_binds_once(lab: Lab) -> None:
    """Both get a challenge (each at its own address); the first confirm wins."""
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ADDR_A)
    mine, theirs = lab.challenge(for_a, ADDR_A, port), lab.challenge(for_a, ATTACKER, port)
    lab.confirm(for_a, mine, ADDR_A, port)
    sends = lab.send(build_confirm(for_a, theirs), ATTACKER, port)
    assert refusal(sends) == "ticket_replayed"
    assert lab.relay.allocations()[0].bound[0 if A < B else 1] == ADDR_A


@pytest.mark.parametrize("forger", ["bad_signature", "unknown_signer"])
def test_forged_ticket_is_refused(lab: Lab, forger: str) -> None:
    if forger == "bad_signature":
        forged = bytearray(ticket(KEY, A, B))
        forged[-5] ^= 0x40
        data, reason = bytes(forged), "ticket_bad_signature"
    else:
        data, reason = ticket(SigningKey.generate(), A, B), "ticket_unknown_signer"
    assert refusal(lab.send(build_allocate(data), ATTACKER, CONTROL)) == reason
    assert lab.relay.allocations() == []


def test_cross_tenant_tickets_cannot_touch_another_tenants_pair() -> None:
    globex_key, globex = signer(("globex",))
    lab = make_lab([TRUSTED, globex])
    port_a, _ = bound_pair(lab)
    claims_acme = ticket(globex_key, A, B)  # globex's gateway claiming tenant acme
    assert refusal(lab.send(build_bind(claims_acme), ATTACKER, port_a)) == "ticket_wrong_tenant"
    same_keys = ticket(globex_key, A, B, tenant="globex")
    assert refusal(lab.send(build_bind(same_keys), ATTACKER, port_a)) == "wrong_port"
    assert lab.allocate(same_keys, ATTACKER) not in (port_a,)  # a separate allocation


def test_ticket_is_bound_to_the_pair_and_the_side(lab: Lab) -> None:
    port_a, port_b = bound_pair(lab)
    for_ac = ticket(KEY, A, C)  # A's ticket for pair (A, C)
    assert refusal(lab.send(build_bind(for_ac), ATTACKER, port_a)) == "wrong_port"
    for_b_side = ticket(KEY, A, B, Side.B)
    assert refusal(lab.send(build_bind(for_b_side), ATTACKER, port_a)) == "wrong_port"
    # The same ticket is accepted on B's port: a ticket admits exactly its pair and side
    # (and only the gateway issues B's tickets, to B).
    assert isinstance(lab.challenge(for_b_side, ("203.0.113.9", 4000), port_b), bytes)


def test_handshakes_must_be_addressed_to_the_ticketed_peer(lab: Lab) -> None:
    port_a, port_b = bound_pair(lab)
    assert lab.send(initiation(C), ADDR_A, port_a) == []  # mac1 keyed for C, not B
    assert lab.send(response(B), ADDR_B, port_b) == []  # B answering itself
    assert lab.relay.counters["bad_mac1"] == 2


# --- return routability ---------------------------------------------------------------


def test_spoofed_source_never_binds(lab: Lab) -> None:
    """The attacker sends BIND as ADDR_A; the challenge goes to ADDR_A, not to it."""
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ATTACKER)
    (challenge,) = lab.send(build_bind(for_a), ADDR_A, port)
    assert challenge.dst == ADDR_A
    own_cookie = lab.challenge(for_a, ATTACKER, port)
    for cookie in (bytes(16), own_cookie):  # a guess, and a cookie for another address
        assert lab.send(build_confirm(for_a, cookie), ADDR_A, port) == []
    assert lab.send(build_confirm(for_a, own_cookie), ATTACKER, port + 1) == []  # other port
    assert lab.relay.counters["bad_cookie"] == 3
    assert lab.relay.allocations()[0].bound == (None, None)


def test_cookie_expires_after_two_windows(lab: Lab) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ADDR_A)
    cookie = lab.challenge(for_a, ADDR_A, port)
    lab.now += 61
    assert lab.send(build_confirm(for_a, cookie), ADDR_A, port) == []


def test_rebinding_after_a_nat_change_moves_the_side(lab: Lab) -> None:
    port_a, port_b = bound_pair(lab)
    moved = ("198.51.100.1", 61000)
    lab.bind(ticket(KEY, A, B), moved)
    assert lab.send(transport(), ADDR_A, port_a) == []
    assert lab.send(transport(), ADDR_B, port_b)[0].dst == moved


# --- destinations -----------------------------------------------------------------------

FORBIDDEN = [
    "127.0.0.1",
    "127.5.5.5",
    "::1",
    "::ffff:127.0.0.1",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::1",
    "0.0.0.0",
    "::",
    "169.254.169.254",
    "169.254.1.1",
    "fe80::1",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",  # the relay's own address
    "::ffff:192.0.2.1",
]


@pytest.mark.parametrize("host", FORBIDDEN)
def test_never_sends_to_forbidden_addresses(lab: Lab, host: str) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ADDR_A)
    src = (host, 51820)
    assert lab.send(build_allocate(for_a), src, CONTROL) == []
    assert lab.send(build_bind(for_a), src, port) == []
    assert lab.relay.counters["forbidden_destination"] == 2


def test_loopback_only_with_the_test_flag() -> None:
    lab = make_lab([TRUSTED], allow_loopback=True)
    for_a, _ = pair_tickets(KEY, A, B)
    assert lab.allocate(for_a, ("127.0.0.1", 1000)) > 0
    assert lab.send(build_allocate(for_a), ("169.254.169.254", 1000), CONTROL) == []
    assert lab.send(build_allocate(for_a), ("::ffff:127.0.0.1", 1000), CONTROL) != []


def test_nothing_is_forwarded_before_the_peer_binds(lab: Lab) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.bind(for_a, ADDR_A)
    assert lab.send(initiation(B), ADDR_A, port) == []
    assert lab.relay.counters["peer_unbound"] == 1


# --- only WireGuard ---------------------------------------------------------------------

NOT_WIREGUARD = [
    b"",
    b"\x01\x00\x00\x00" + bytes(143),
    b"\x01\x00\x00\x00" + bytes(145),
    b"\x02\x00\x00\x00" + bytes(87),
    b"\x03\x00\x00\x00" + bytes(61),
    b"\x04\x00\x00\x00" + bytes(27),  # 31 bytes: shorter than a keepalive
    b"\x04\x00\x00\x00" + bytes(29),  # payload not a multiple of 16
    b"\x04\x00\x00\x00" + bytes(12 + 575 + 16),  # off the grid below a full 576-byte packet
    b"\x04\x01\x00\x00" + bytes(28),  # reserved byte set
    b"\x05\x00\x00\x00" + bytes(28),
    b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),  # STUN
    b"GET / HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("data", NOT_WIREGUARD)
def test_non_wireguard_datagrams_are_dropped(lab: Lab, data: bytes) -> None:
    port_a, _ = bound_pair(lab)
    assert lab.send(data, ADDR_A, port_a) == []
    assert lab.relay.counters["forwarded"] == 0


@pytest.mark.parametrize("mtu", [576, 1280, 1420, 1423])
def test_a_full_mtu_packet_off_the_16_byte_grid_is_forwarded(lab: Lab, mtu: int) -> None:
    """WireGuard pads to 16 bytes but never past the MTU: at MTU 1420 a full packet
    is 16 + 1420 + 16 bytes, off the grid, and must pass (both paths use one rule)."""
    port_a, _ = bound_pair(lab)
    data = b"\x04\x00\x00\x00" + bytes(12 + mtu + 16)
    assert lab.send(data, ADDR_A, port_a) != []
    assert lab.relay.handle_batch([(data, ADDR_A)] * 3, port_a, lab.now) != {}


def test_max_datagram_size() -> None:
    lab = make_lab([TRUSTED], max_datagram=1024)
    port_a, _ = bound_pair(lab)
    assert lab.send(transport(1008), ADDR_A, port_a) != []
    assert lab.send(transport(1024), ADDR_A, port_a) == []
    assert lab.relay.counters["too_large"] == 1


# --- quotas, expiry, fail closed ----------------------------------------------------------


def test_allocations_per_device() -> None:
    lab = make_lab([TRUSTED], max_allocations_per_device=2)
    lab.allocate(ticket(KEY, A, B), ADDR_A)
    lab.allocate(ticket(KEY, A, C), ADDR_A)
    assert refusal(lab.send(build_allocate(ticket(KEY, A, D)), ADDR_A, CONTROL)) == "device_quota"
    assert lab.allocate(ticket(KEY, C, D), ADDR_A) > 0  # C has one left; D is not affected
    assert refusal(lab.send(build_allocate(ticket(KEY, C, B)), ADDR_A, CONTROL)) == "device_quota"


def test_relay_full() -> None:
    lab = make_lab([TRUSTED], ports=(40000, 40001, 40002, 40003, 40004))
    lab.allocate(ticket(KEY, A, B), ADDR_A)
    lab.allocate(ticket(KEY, C, D), ADDR_A)
    assert refusal(lab.send(build_allocate(ticket(KEY, A, C)), ADDR_A, CONTROL)) == "relay_full"


def test_bytes_per_second_per_client() -> None:
    lab = make_lab([TRUSTED], bytes_per_second=1000.0, burst_bytes=1000.0)
    port_a, port_b = bound_pair(lab)
    data = transport(144)  # 160 bytes
    assert sum(len(lab.send(data, ADDR_A, port_a)) for _ in range(10)) == 6
    assert lab.relay.counters["over_bandwidth"] == 4
    assert lab.send(data, ADDR_B, port_b) != []  # B has its own bucket
    lab.now += 0.5
    assert sum(len(lab.send(data, ADDR_A, port_a)) for _ in range(10)) == 3


def test_idle_allocations_expire_and_traffic_keeps_them(lab: Lab) -> None:
    port_a, _ = bound_pair(lab)
    lab.now += 50
    assert lab.send(transport(), ADDR_A, port_a) != []
    assert lab.relay.next_deadline() == lab.now + 60
    assert lab.relay.expire(lab.now + 59) == 0
    assert lab.relay.expire(lab.now + 60) == 1
    assert lab.relay.allocations() == [] and lab.relay.next_deadline() is None
    assert lab.send(transport(), ADDR_A, port_a) == []
    assert lab.relay.counters["idle_expired"] == 1


def test_unbound_allocations_expire_and_free_their_ports() -> None:
    lab = make_lab([TRUSTED], ports=(40000, 40001))
    lab.allocate(ticket(KEY, A, B), ADDR_A)
    assert refusal(lab.send(build_allocate(ticket(KEY, C, D)), ADDR_A, CONTROL)) == "relay_full"
    lab.now = NOW + 60
    assert lab.relay.expire(lab.now) == 1
    assert lab.allocate(ticket(KEY, C, D, now=NOW + 60), ADDR_A) in (40000, 40001)


def test_no_verify_keys_admits_nobody() -> None:
    lab = make_lab([])
    assert refusal(lab.send(build_allocate(ticket(KEY, A, B)), ADDR_A, CONTROL)) == (
        "no_verify_keys"
    )
    assert lab.relay.allocations() == []


def test_full_replay_cache_fails_closed() -> None:
    lab = make_lab([TRUSTED], max_replay_entries=1)
    for_a, for_b = pair_tickets(KEY, A, B)
    lab.bind(for_a, ADDR_A)
    port_b = lab.allocate(for_b, ADDR_B)
    cookie = lab.challenge(for_b, ADDR_B, port_b)
    sends = lab.send(build_confirm(for_b, cookie), ADDR_B, port_b)
    assert refusal(sends) == "replay_cache_full"


def test_control_messages_are_rate_limited_per_source(lab: Lab) -> None:
    data = build_allocate(ticket(SigningKey.generate(), A, B))
    replies = sum(len(lab.send(data, ATTACKER, CONTROL)) for _ in range(200))
    assert replies == 50  # the burst (each a REFUSED); no more until tokens refill
    assert lab.relay.counters["rate_limited"] == 150


def test_wrong_messages_on_the_wrong_port(lab: Lab) -> None:
    for_a, _ = pair_tickets(KEY, A, B)
    port = lab.allocate(for_a, ADDR_A)
    assert lab.send(build_bind(for_a), ADDR_A, CONTROL) == []
    assert lab.send(build_allocate(for_a), ADDR_A, port) == []
    assert lab.relay.counters["unexpected_control"] == 2


# --- under attack -----------------------------------------------------------------------


def test_legitimate_pair_keeps_flowing_while_attacked(lab: Lab) -> None:
    port_a, port_b = bound_pair(lab)
    forged, stolen = ticket(SigningKey.generate(), A, B), pair_tickets(KEY, A, B)[0]
    attacks = [
        (b"\xff" * 1400, ATTACKER, CONTROL),
        (build_allocate(forged), ATTACKER, CONTROL),
        (build_bind(stolen), ADDR_A, port_a),  # spoofing A: challenge goes to A
        (build_confirm(stolen, bytes(16)), ADDR_A, port_a),
        (transport(1000), ATTACKER, port_a),
        (initiation(B), ATTACKER, port_b),
        (transport(), ("127.0.0.1", 51820), port_a),
        (build_bind(forged), ("169.254.169.254", 80), port_b),
    ]
    forwarded = 0
    for round_ in range(100):
        data, src, port = attacks[round_ % len(attacks)]
        for send in lab.send(data, src, port):
            assert send.dst == src and send.local_port == port
            if src == ADDR_A:  # the only thing the spoofed A may see is a challenge
                assert isinstance(parse_control(send.data), Challenge)
        packet = transport(64)
        assert lab.send(packet, ADDR_A, port_a) == [Send(ADDR_B, port_b, packet)]
        assert lab.send(packet, ADDR_B, port_b) == [Send(ADDR_A, port_a, packet)]
        forwarded += 2
        lab.now += 0.01
    assert lab.relay.counters["forwarded"] == forwarded
    assert [v.bound for v in lab.relay.allocations()] == [
        (ADDR_A, ADDR_B) if A < B else (ADDR_B, ADDR_A)
    ]


def test_every_counted_outcome_is_declared(lab: Lab) -> None:
    port_a, _ = bound_pair(lab)
    assert lab.relay.counters == {"allocated": 2, "challenged": 2, "bound": 2}
    assert lab.send(b"junk", ATTACKER, CONTROL) == []
    assert lab.send(transport(64), ATTACKER, port_a) == []
    assert len(lab.send(transport(64), ADDR_A, port_a)) == 1
    assert lab.relay.counters == {
        "allocated": 2,
        "challenged": 2,
        "bound": 2,
        "malformed_control": 1,
        "unbound_source": 1,
        "forwarded": 1,
    }
    assert set(lab.relay.counters) <= set(OUTCOMES)


def test_loopback_flag_still_refuses_the_relays_own_ports() -> None:
    lab = make_lab([TRUSTED], allow_loopback=True, own_addresses=("127.0.0.1",))
    for_a, _ = pair_tickets(KEY, A, B)
    assert lab.allocate(for_a, ("127.0.0.1", 1000)) > 0  # a peer on the relay's host
    for port in (CONTROL, 40000, 40005):
        assert lab.send(build_allocate(for_a), ("127.0.0.1", port), CONTROL) == []
        assert lab.send(build_allocate(for_a), ("::ffff:127.0.0.1", port), CONTROL) == []

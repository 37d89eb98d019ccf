"""Revoked devices at the relay: the core releases their allocations and refuses their
older tickets; the revocation document's codec; the kernel path follows the release."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from lab.relay_fixtures import (
    CONTROL,
    NOW,
    TENANT,
    Lab,
    make_lab,
    node,
    pair_tickets,
    refusal,
    signer,
    ticket,
    transport,
)
from relay.client.bind import build_allocate, build_bind
from relay.controlwire import REASONS, Refused, build_control, parse_control
from relay.forwarding import OUTCOMES, Send
from relay.revocations import (
    WINDOW,
    build_revocations,
    parse_revocations,
    revocations_document,
)
from relay.tickets import MAX_LIFETIME, Side
from tests.unit.relay.test_kernelpath import bound_pair

KEY, TRUSTED = signer()
A, B, C = node("dev-a"), node("dev-b"), node("dev-c")
ADDR_A, ADDR_B, ADDR_C = ("198.51.100.1", 51820), ("203.0.113.7", 40001), ("192.0.2.9", 7)


@pytest.fixture
def lab() -> Lab:
    return make_lab([TRUSTED], own_addresses=("192.0.2.1",))


def bind(lab: Lab, key: SigningKey, a: Any, b: Any, addr_a: Any, addr_b: Any) -> tuple[int, int]:
    for_a, for_b = pair_tickets(key, a, b, now=lab.now)
    return lab.bind(for_a, addr_a), lab.bind(for_b, addr_b)


def test_revoking_either_side_releases_the_pair_and_stops_forwarding(lab: Lab) -> None:
    changes: list[int] = []
    lab.relay.on_change = lambda: changes.append(1)
    port_a, port_b = bind(lab, KEY, A, B, ADDR_A, ADDR_B)
    port_c, _ = bind(lab, KEY, C, A, ADDR_C, ADDR_A)
    bind(lab, KEY, B, C, ADDR_B, ADDR_C)
    data = transport()
    assert lab.send(data, ADDR_A, port_a) == [Send(ADDR_B, port_b, data)]
    before = len(changes)
    assert lab.relay.revoke({(TENANT, "dev-a"): NOW}) == 2  # A-B and C-A; B-C stays
    assert len(changes) == before + 1
    assert [sorted((a.pair.first.device_id, a.pair.second.device_id))
            for a in lab.relay.allocations()] == [["dev-b", "dev-c"]]  # fmt: skip
    assert lab.relay.counters["revoked"] == 2
    assert lab.send(transport(), ADDR_A, port_a) == []
    assert lab.send(transport(), ADDR_C, port_c) == []
    assert lab.relay.revoke({(TENANT, "dev-a"): NOW}) == 0  # nothing left to release


def test_tickets_issued_before_the_removal_are_refused_later_ones_admitted(lab: Lab) -> None:
    lab.now = NOW + 10
    lab.relay.revoke({(TENANT, "dev-b"): NOW + 10})
    for side, (a, b) in ((Side.A, (A, B)), (Side.B, (B, A))):  # either node named
        old = ticket(KEY, a, b, side, now=NOW + 9)
        sends = lab.send(build_allocate(old), ADDR_A, CONTROL)
        assert refusal(sends) == "ticket_revoked"
    assert lab.relay.allocations() == []
    lab.now = NOW + 11
    assert lab.allocate(ticket(KEY, A, B, now=NOW + 11), ADDR_A) > 0  # issued after revoked_at
    assert lab.relay.counters["ticket_revoked"] == 2


def test_a_revoked_ticket_cannot_rebind_an_allocation_it_holds(lab: Lab) -> None:
    """Released: neither the peer's ticket (it names A) nor a fresh one for A, both issued
    before the removal, makes the pair again or binds on its old port."""
    for_a, for_b = pair_tickets(KEY, A, B)
    other_a = ticket(KEY, A, B, now=NOW)
    port_a = lab.bind(for_a, ADDR_A)
    lab.relay.revoke({(TENANT, "dev-a"): NOW + 1})
    assert lab.relay.allocations() == []
    assert refusal(lab.send(build_allocate(for_b), ADDR_B, CONTROL)) == "ticket_revoked"
    assert refusal(lab.send(build_allocate(other_a), ADDR_A, CONTROL)) == "ticket_revoked"
    assert lab.send(build_bind(other_a), ADDR_A, port_a) == []  # the port is no allocation's
    assert lab.relay.counters["no_allocation"] == 1


def test_another_tenants_device_of_the_same_id_is_untouched(lab: Lab) -> None:
    bind(lab, KEY, A, B, ADDR_A, ADDR_B)
    assert lab.relay.revoke({("other", "dev-a"): NOW + 1}) == 0
    assert len(lab.relay.allocations()) == 1


def test_a_new_list_replaces_the_last(lab: Lab) -> None:
    lab.relay.revoke({(TENANT, "dev-a"): NOW + 1})
    lab.relay.revoke({})
    assert lab.allocate(ticket(KEY, A, B, now=NOW), ADDR_A) > 0


def test_the_refusal_reason_is_on_the_wire_and_older_agents_read_unknown() -> None:
    code = REASONS.index("ticket_revoked")
    assert REASONS[:code] == REASONS[:-1]  # appended: every older code unchanged
    data = build_control(Refused(bytes(16), "ticket_revoked"))
    assert data[-1] == code
    assert parse_control(data) == Refused(bytes(16), "ticket_revoked")
    older = ("unknown", *REASONS[1:-1])
    assert (older[code] if code < len(older) else "unknown") == "unknown"
    assert {"revoked", "ticket_revoked"} <= set(OUTCOMES)


# --- the document --------------------------------------------------------------------------


def test_the_document_round_trips_and_the_window_outlives_every_ticket() -> None:
    doc = build_revocations([("default", "dev_2", 20.5), ("default", "dev_1", 10.0)])
    assert doc == {
        "revoked": [
            {"tenant": "default", "device_id": "dev_1", "revoked_at": 10.0},
            {"tenant": "default", "device_id": "dev_2", "revoked_at": 20.5},
        ],
        "window": WINDOW,
    }
    assert revocations_document(json.dumps(doc)) == {
        ("default", "dev_1"): 10.0,
        ("default", "dev_2"): 20.5,
    }
    assert WINDOW > MAX_LIFETIME + 5  # a ticket is refused from expiry + 5 s skew on


def test_fields_a_newer_gateway_adds_are_ignored() -> None:
    doc = {
        "revoked": [{"tenant": "t", "device_id": "d", "revoked_at": 1, "reason": "expired"}],
        "window": 360,
        "generated_at": 5,
        "more": {"x": 1},
    }
    assert parse_revocations(doc) == {("t", "d"): 1.0}


def test_a_device_listed_twice_keeps_its_latest_removal() -> None:
    doc = {"revoked": [{"tenant": "t", "device_id": "d", "revoked_at": at} for at in (5, 9, 7)]}
    assert parse_revocations(doc) == {("t", "d"): 9.0}


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {},
        {"revoked": {}},
        {"signers": []},
        {"revoked": [1]},
        {"revoked": [{"tenant": "t", "device_id": "d"}]},
        {"revoked": [{"tenant": "t", "device_id": "d", "revoked_at": "1"}]},
        {"revoked": [{"tenant": "t", "device_id": "d", "revoked_at": True}]},
        {"revoked": [{"tenant": "t", "device_id": "d", "revoked_at": float("nan")}]},
        {"revoked": [{"tenant": "", "device_id": "d", "revoked_at": 1}]},
        {"revoked": [{"tenant": "t", "device_id": "x" * 65, "revoked_at": 1}]},
        {"revoked": [{"tenant": "t", "device_id": 3, "revoked_at": 1}]},
    ],
)
def test_bad_documents_are_refused_whole(doc: Any) -> None:
    with pytest.raises(ValueError):
        parse_revocations(doc)


@pytest.mark.parametrize("body", [b"", b"{", b"\xff", b"null"])
def test_a_body_that_is_no_document_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        revocations_document(body)


text = st.text(min_size=1, max_size=16)


@given(st.lists(st.tuples(text, text, st.floats(0, 2e9)), max_size=20))
def test_any_built_document_parses_to_its_latest_removals(
    entries: list[tuple[str, str, float]],
) -> None:
    expected: dict[tuple[str, str], float] = {}
    for tenant, device, at in entries:
        expected[(tenant, device)] = max(at, expected.get((tenant, device), at))
    assert revocations_document(json.dumps(build_revocations(entries))) == expected


# --- the kernel fast path follows the release (recording nftables; the lab runs the real one)


async def test_the_kernel_path_removes_a_revoked_pair_at_once() -> None:
    path, lab, nft, forgotten = await bound_pair()
    lab.relay.on_change = path.changed  # as start_kernel_path wires it
    (inst,) = path.installed.values()
    ports = frozenset(side.relay_port for side in inst.pair.sides)
    assert lab.relay.revoke({("acme", "dev-b"): NOW + 1}) == 1
    async with asyncio.timeout(5):  # the reconcile runs as a task: no timer tick needed
        while path.installed:
            await asyncio.sleep(0.01)
    assert not path.installed and not lab.relay.allocations()
    assert "delete element" in nft.scripts[-1]
    assert forgotten[-1] == ports  # conntrack forgets the pair's flows: no NAT binding survives


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
entry_like = st.fixed_dictionaries(
    {}, optional={"tenant": json_values, "device_id": json_values, "revoked_at": json_values}
)


@given(st.one_of(json_values, st.fixed_dictionaries({"revoked": st.lists(entry_like)})))
def test_any_json_is_a_list_or_a_value_error(data: Any) -> None:
    try:
        revoked = parse_revocations(data)
    except ValueError:
        return
    assert all(isinstance(at, float) for at in revoked.values())

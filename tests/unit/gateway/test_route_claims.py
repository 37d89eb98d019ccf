"""Overlapping advertised routes: refused at enrollment (400), and in the map the
device placed first keeps a prefix, the other is told in its self view; when the
holder lets go, the other gets it (deltas still rebuild the full map)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mapping.netmap import NetworkState, apply_remove, apply_upsert, full_map
from gateway.mapping.routeclaims import RouteClaims
from identity.policy import Policy
from lab.api_client import Client, RecordingBroker, assert_refused, create_key, enroll, snapshot
from lab.netmap_replay import IDS, device, replay

NESTED = ["10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/24", "10.1.2.128/25", "fd00:1::/64"]


def test_claims_find_containing_contained_and_equal_prefixes() -> None:
    claims = RouteClaims()
    assert claims.claim("a", ["10.1.2.0/24", "fd00:1::/64"]) == (
        ("10.1.2.0/24", "fd00:1::/64"), (),
    )  # fmt: skip
    assert claims.overlapping("10.1.0.0/16") == {"a"}  # contains a's /24
    assert claims.overlapping("10.1.2.7/32") == {"a"}  # inside it
    assert claims.overlapping("10.1.2.0/24") == {"a"}
    assert claims.overlapping("10.1.3.0/24") == set() and claims.overlapping("nonsense") == set()
    assert claims.overlapping("fd00:1:0:0:1::/80") == {"a"}
    kept, refused = claims.claim("b", ["10.1.0.0/16", "10.2.0.0/16"])
    assert (kept, refused) == (("10.2.0.0/16",), ("10.1.0.0/16",))
    claims.release("a")
    assert claims.overlapping("10.1.0.0/16") == set()
    assert claims.claim("b", ["10.1.0.0/16", "10.1.5.0/24"])[1] == ()  # its own may nest


def test_the_second_device_is_refused_the_route_and_told_why() -> None:
    state = NetworkState(Policy.allow_all())
    apply_upsert(state, device(0, routes=("10.1.0.0/16",)))
    fan = apply_upsert(state, device(1, routes=("10.1.2.0/24", "10.9.0.0/24")))
    assert fan.peers["d1"].allowed_ips[2:] == ("10.9.0.0/24",)  # d0 never sees the clash
    assert full_map(state, "d1", 2).self_view.refused_routes == ("10.1.2.0/24",)
    assert full_map(state, "d0", 2).self_view.refused_routes == ()
    assert state.route_owners("10.1.2.0/24") == {"d0"}


def test_the_refused_device_gets_the_route_once_the_holder_is_removed() -> None:
    state = NetworkState(Policy.allow_all())
    apply_upsert(state, device(0, routes=("10.1.0.0/16",)))
    apply_upsert(state, device(1, routes=("10.1.2.0/24",)))
    apply_upsert(state, device(2))
    fan = apply_remove(state, "d0")
    assert fan.updates["d2"].remove == ("d0",) and fan.updates["d2"].upsert == ("d1",)
    assert fan.updates["d1"].self_view is not None
    assert fan.updates["d1"].self_view.refused_routes == ()
    assert full_map(state, "d2", 3).peers["d1"].allowed_ips[2:] == ("10.1.2.0/24",)


def test_a_load_keeps_the_first_placed_device_as_holder() -> None:
    devices = [device(1, routes=("10.1.2.0/24",)), device(0, routes=("10.1.0.0/16",))]
    state = NetworkState(Policy.allow_all(), devices)  # the store loads by creation time
    assert state.route_owners("10.1.0.0/16") == {"d1"}
    assert full_map(state, "d0", 1).self_view.refused_routes == ("10.1.0.0/16",)


upserts = st.builds(
    lambda i, routes: ("upsert", device(i, routes=tuple(routes))),
    st.integers(0, len(IDS) - 1),
    st.lists(st.sampled_from(NESTED), max_size=3, unique=True),
)
operations = st.lists(
    st.one_of(upserts, st.builds(lambda i: ("remove", i), st.sampled_from(IDS))), max_size=25
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_no_two_devices_carry_overlapping_routes_and_deltas_stay_exact(
    ops: list[tuple[str, Any]],
) -> None:
    state = NetworkState(Policy.allow_all())
    for _ in replay(state, ops):  # checks: a route is withheld only if another holds it
        shown = {d.id: state.peer(d.id).allowed_ips[2:] for d in state}
        for owner, routes in shown.items():
            for route in routes:
                assert state.route_owners(route) == {owner}


async def test_enrolling_a_route_another_device_carries_is_refused(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    first = await enroll(client, secret, name="node-1", routes=["10.244.1.0/24"])
    assert first.status == 201
    holder = (await first.json())["device"]["id"]
    before = await snapshot(client)
    resp = await enroll(client, secret, name="node-2", routes=["10.244.0.0/16"])
    body = await resp.json()
    assert resp.status == 400 and body["error"] == "bad_input"
    assert "'10.244.0.0/16'" in body["message"] and holder in body["message"]
    assert await snapshot(client) == before  # no device, no key use, no map version
    await assert_refused(
        client, await enroll(client, secret, name="node-3", routes=["10.244.1.128/25"]), 400
    )
    same_name = await enroll(client, secret, name="node-1", routes=["10.244.1.0/24"])
    assert same_name.status == 201  # a re-enrollment's old device is not a clash here...
    device_id = (await same_name.json())["device"]["id"]
    netmap = full_map(broker._state, device_id, broker.version)
    assert netmap.self_view.refused_routes == ("10.244.1.0/24",)  # ...but the map refuses it

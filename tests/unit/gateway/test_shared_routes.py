"""The very same prefix from several devices (a cluster's Service CIDR from every node):
enrolled, carried by the first, the others standing by; the next takes over when the
holder is removed. A prefix that only overlaps stays refused at enrollment."""

from __future__ import annotations

from gateway.mapping.netmap import NetworkState, apply_remove, apply_upsert, full_map
from identity.policy import Policy
from lab.api_client import Client, RecordingBroker, assert_refused, create_key, enroll
from lab.netmap_replay import device

SERVICES = "10.96.0.0/12"


async def test_the_same_prefix_enrolls_and_stands_by(
    client: Client, broker: RecordingBroker
) -> None:
    secret = (await create_key(client, reusable=True))["secret"]
    first = await enroll(client, secret, name="node-1", routes=["10.244.1.0/24", SERVICES])
    second = await enroll(client, secret, name="node-2", routes=["10.244.2.0/24", SERVICES])
    assert first.status == 201 and second.status == 201, await second.text()
    one, two = (await first.json())["device"]["id"], (await second.json())["device"]["id"]
    assert full_map(broker._state, one, broker.version).self_view.refused_routes == ()
    standby = full_map(broker._state, two, broker.version)
    assert standby.self_view.refused_routes == (SERVICES,)
    assert full_map(broker._state, one, broker.version).peers[two].allowed_ips[2:] == (
        "10.244.2.0/24",
    )  # its own pods still carried
    # inside or around the shared prefix is still a clash
    for route in ("10.96.0.0/16", "10.0.0.0/8"):
        await assert_refused(
            client, await enroll(client, secret, name="node-3", routes=[route]), 400
        )


def test_the_next_device_takes_the_shared_prefix_over() -> None:
    state = NetworkState(Policy.allow_all())
    apply_upsert(state, device(0, routes=("10.244.0.0/24", SERVICES)))
    apply_upsert(state, device(1, routes=("10.244.1.0/24", SERVICES)))
    apply_upsert(state, device(2))
    assert full_map(state, "d2", 3).peers["d1"].allowed_ips[2:] == ("10.244.1.0/24",)
    fan = apply_remove(state, "d0")
    assert fan.updates["d2"].upsert == ("d1",)
    assert full_map(state, "d2", 4).peers["d1"].allowed_ips[2:] == ("10.244.1.0/24", SERVICES)
    assert full_map(state, "d1", 4).self_view.refused_routes == ()

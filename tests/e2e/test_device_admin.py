"""End to end in the lab: an operator renames a device and every peer agent's map shows
the new name; the device list shows who is online; expiring a device's key now drops it
from every peer's WireGuard and tears its own interface down.

The seconds from the admin call returning until the agents had the change are printed
(run with ``-s``); each probe of a name is a ``wiregate status`` process, so those
figures include its start (the revocation budget is held by test_revoke_rotate.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from lab.harness import Agent, Lab, Wiregate, poll
from tests.e2e.test_revoke_rotate import interface_gone, start_agents, time_until, wg_peers

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]

WAIT = 30.0  # seconds allowed for a change to reach every agent (not a budget)


def peer_names(gateway: Wiregate, agent: Agent) -> dict[str, str]:
    """Peer id → name in the agent's applied map (``wiregate status``)."""
    return {p["id"]: p["name"] for p in gateway.status(agent)["peers"]}


def named(gateway: Wiregate, agent: Agent, device_id: str, name: str) -> Callable[[], bool]:
    return lambda: peer_names(gateway, agent).get(device_id) == name


def without(agent: Agent, key: str) -> Callable[[], bool]:
    return lambda: key not in wg_peers(agent)


def test_rename_and_expire_reach_every_peer_agent(lab: Lab, gateway: Wiregate) -> None:
    mesh = start_agents(lab, gateway, {"k": ["a", "b", "c"]})
    ids = {name: status["device"]["id"] for name, status in mesh.statuses.items()}
    listed = {d["id"]: d for d in gateway.devices()}
    assert all(listed[i]["online"] for i in ids.values()), listed
    assert all(listed[i]["tags"] == ["tag:lab"] for i in ids.values())

    # 1. rename b: a and c see the new name in their maps
    gateway.admin("devices", "rename", ids["b"], "db-main")
    start = time.monotonic()
    renamed = {n: named(gateway, mesh.agents[n], ids["b"], "db-main") for n in ("a", "c")}
    took = time_until(renamed, start, WAIT)
    print(f"\nrename reached: {took}")
    assert set(took) == {"a", "c"}, took
    assert mesh.hosts["a"].ping(mesh.addresses("b")[0])  # the tunnel did not notice
    poll(lambda: gateway.status(mesh.agents["b"])["device"]["name"] == "db-main", timeout=10,
         what="b's own status to show its new name")  # fmt: skip

    # 2. expire c's key now: its peers drop it and its interface goes
    c_key = mesh.statuses["c"]["device"]["public_key"]
    assert c_key in wg_peers(mesh.agents["a"])
    gateway.admin("devices", "expire", "c")  # by name
    start = time.monotonic()
    gone = {n: without(mesh.agents[n], c_key) for n in ("a", "b")}
    gone["interface"] = lambda: interface_gone(mesh.agents["c"])
    took = time_until(gone, start, WAIT)
    print(f"expiry reached: {took}")
    assert set(took) == {"a", "b", "interface"}, took
    assert ids["c"] not in {d["id"] for d in gateway.devices()}
    poll(lambda: ids["c"] not in peer_names(gateway, mesh.agents["a"]), timeout=10,
         what="c to leave a's map")  # fmt: skip
    events = gateway.admin_json("audit")["events"]
    assert {("admin:socket", "device.rename"), ("admin:socket", "device.expire")} <= {
        (e["actor"], e["action"]) for e in events
    }

"""End-to-end fixtures: a lab with a wiregate gateway and four enrolled agents."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.harness import Lab, Wiregate
from lab.lab_fixture import lab, pytest_runtest_makereport
from lab.mesh import Mesh
from lab.nat import CONTROL_PORT, RELAY_HOSTS, start_gateway_with_relays

__all__ = ["lab", "pytest_runtest_makereport"]

MESH_HOSTS = ("a", "b", "c", "d")


@pytest.fixture
def gateway(lab: Lab) -> Wiregate:
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    return wiregate


@pytest.fixture
def mesh(lab: Lab, gateway: Wiregate) -> Iterator[Mesh]:
    hosts = {name: lab.add_host(name) for name in MESH_HOSTS}
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=True)
    agents = {name: gateway.start_agent(host, key_file) for name, host in hosts.items()}
    statuses = gateway.wait_mesh(list(agents.values()), timeout=90)
    yield Mesh(lab, gateway, hosts, agents, key_file, statuses)


@pytest.fixture
def gateway_with_relays(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Wiregate:
    relays = [f"{rid}={host}:{CONTROL_PORT}" for rid, host in RELAY_HOSTS.items()]
    return start_gateway_with_relays(lab, monkeypatch, relays)

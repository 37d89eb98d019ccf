"""End-to-end fixtures: a lab with a wiregate gateway and four enrolled agents."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.harness import Agent, Host, Lab, Wiregate, bare
from tests.lab import conftest as lab_conftest

# The lab fixture, and the report hook that lets it print process logs on failure.
lab = lab_conftest.lab
pytest_runtest_makereport = lab_conftest.pytest_runtest_makereport

MESH_HOSTS = ("a", "b", "c", "d")


@dataclass
class Mesh:
    """A running gateway with one agent per host, every agent holding the full map."""

    lab: Lab
    wiregate: Wiregate
    hosts: dict[str, Host]
    agents: dict[str, Agent]
    key_file: Path
    statuses: dict[str, dict[str, Any]]

    def addresses(self, name: str) -> list[str]:
        """Tunnel addresses of the agent on host ``name``: [IPv4, IPv6]."""
        return [bare(a) for a in self.statuses[name]["device"]["addresses"]]

    def refresh(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        self.statuses = self.wiregate.wait_mesh(list(self.agents.values()), timeout=timeout)
        return self.statuses


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

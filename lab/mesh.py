"""A running gateway with one agent per lab host, and reachability checks across it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.harness import Agent, Host, Lab, Wiregate, bare
from lab.ping import ping_until


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


def unreachable_pairs(mesh: Mesh, names: list[str], timeout: float = 15.0) -> list[str]:
    """Every (source, destination, family) among ``names`` whose tunnel ping fails."""
    failed = []
    for src, dst in itertools.permutations(names, 2):
        for family, addr in zip(("v4", "v6"), mesh.addresses(dst), strict=True):
            if not ping_until(mesh.hosts[src], addr, timeout):
                failed.append(f"{src}->{dst} {family} ({addr})")
    return failed


def wg_peers(agent: Agent) -> set[str]:
    """Public keys configured on ``agent``'s interface right now (``wg show IFACE peers``)."""
    out = agent.host.run(["wg", "show", agent.iface, "peers"]).stdout
    return set(out.split())

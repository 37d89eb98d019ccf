"""The demo's path table is the agents' own status, and the paths it names are real.

The demo's network part (lab/demo.py) on a TLS gateway: its two relays (UDP and
TLS on 443), an open host, the two hosts behind symmetric NATs and the one behind
a TCP-only firewall. Once every pair has settled, the table built from each
agent's ``wiregate status`` must show, under each device, every peer with the path
and reason that device's agent reports; the pair of symmetric-NAT hosts must be
relayed and the TCP-only host relayed over TCP to everyone (each saying why); and
what the table says must hold on the wire: WireGuard's live endpoint for a
relayed peer is that relay, the TCP-only host's connection to a relay's 443 is
established, and every pair answers pings across its tunnel.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from lab.demo import (
    add_nat_hosts,
    agent_environment,
    path_label,
    peer_paths,
    status_table,
    use_relays,
    wait_paths,
)
from lab.harness import Agent, Lab, Wiregate, bare
from lab.nat import RELAY_HOSTS, RELAY_PORTS, TCP_PORT, start_relays
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


def table_rows(table: str) -> dict[tuple[str, str], str]:
    """(device, peer) -> the peer's line under that device's block."""
    rows: dict[tuple[str, str], str] = {}
    device = ""
    for line in table.splitlines()[2:]:
        if not line.startswith(" "):
            device = line.split()[0]
        else:
            rows[(device, line.split()[0])] = line
    return rows


def live_endpoints(agent: Agent) -> dict[str, str]:
    """Public key -> endpoint, read from WireGuard itself (``wg show IFACE endpoints``)."""
    out = agent.host.run(["wg", "show", agent.iface, "endpoints"]).stdout
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


def test_demo_status_table_shows_each_agents_own_paths(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    wiregate = Wiregate(lab, tls=True)
    use_relays(wiregate)
    wiregate.start_gateway()
    start_relays(lab, wiregate, tcp_ca=wiregate.ca)
    for name, value in agent_environment().items():
        monkeypatch.setenv(name, value)
    key = wiregate.create_key(tags="tag:demo", expiry="1h", reusable=True)
    hosts = {"alpha": lab.add_host("alpha"), **add_nat_hosts(lab)}
    agents = {name: wiregate.start_agent(host, key) for name, host in hosts.items()}
    wiregate.wait_mesh(list(agents.values()), timeout=120)
    statuses, unsettled = wait_paths(wiregate, list(agents.values()), timeout=90)
    assert not unsettled, unsettled

    reports = peer_paths(statuses)
    assert set(reports) == set(itertools.permutations(hosts, 2))
    table = status_table(statuses)
    print(table)
    rows = table_rows(table)
    assert set(rows) == set(reports)
    for pair, report in reports.items():
        assert path_label(report) in rows[pair], (pair, report, rows[pair])
        assert report["reason"] and report["reason"] in rows[pair], (pair, rows[pair])
    for name, status in statuses.items():  # each device's line names its measured NAT
        [line] = [ln for ln in table.splitlines() if ln.startswith(f"{name} ")]
        assert f"NAT: {status['netcheck']['nat_type']}" in line, line

    # the two symmetric NATs meet only through a relay, and both sides say why
    for viewer, peer in (("sierra", "romeo"), ("romeo", "sierra")):
        report = reports[(viewer, peer)]
        assert report["path"] == "relayed", report
        assert "symmetric" in report["reason"], report
        assert f"relayed via {report['relay']}" in rows[(viewer, peer)]
        _check_relayed_on_the_wire(agents[viewer], statuses[peer], report)

    # the TCP-only host reaches everyone relayed over TCP 443, and says why
    for peer in (p for p in hosts if p != "tango"):
        report = reports[("tango", peer)]
        assert report["state"] == "relayed_tcp" and report["path"] == "relayed", report
        assert "UDP blocked" in report["reason"] and "TCP" in report["reason"], report
        assert f"relayed over TCP via {report['relay']}" in rows[("tango", peer)]
        assert reports[(peer, "tango")]["path"] == "relayed", reports[(peer, "tango")]
    router_wan = lab.routers["rtango"].wan_addr
    streams = lab.internet.run(["ss", "-Htn", "state", "established", "sport", f"= :{TCP_PORT}"])
    assert f"{router_wan}:" in streams.stdout, streams.stdout

    addresses = {n: bare(s["device"]["addresses"][0]) for n, s in statuses.items()}
    failed = [
        f"{a}->{b}"
        for a, b in itertools.permutations(hosts, 2)
        if not ping_until(hosts[a], addresses[b], timeout=20)
    ]
    assert not failed, f"unreachable: {failed}\n{json.dumps(reports, indent=1)}"


def _check_relayed_on_the_wire(
    viewer: Agent, peer_status: dict[str, Any], report: dict[str, Any]
) -> None:
    """WireGuard on ``viewer`` sends the peer's packets to the relay the report names."""
    endpoint = live_endpoints(viewer)[peer_status["device"]["public_key"]]
    host, _, port = endpoint.rpartition(":")
    first, last = RELAY_PORTS[report["relay"]]
    assert host == RELAY_HOSTS[report["relay"]] and first <= int(port) <= last, (
        endpoint,
        report,
    )

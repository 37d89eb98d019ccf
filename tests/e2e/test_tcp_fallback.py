"""The TCP-only host of the NAT matrix leaves TCP once its router passes UDP again.

Two hosts of the matrix (lab/nat.py): ``t1`` behind a firewall that drops all UDP
and lets only TCP to the relays' 443 and to the gateway out, and the open host
``o1``; the matrix's gateway and relays (UDP and TLS on 443, a lab CA the agents
trust). Once ``t1`` reaches ``o1`` relayed over TCP 443 (its path and reason, and
``wiregate status``'s table, say so and why; the relay has the connection on 443),
the router passes UDP again: the pair must leave TCP for the UDP relay or a direct
path, and still reach each other. That every pair with ``t1`` is relayed over TCP,
and answers pings, is tests/e2e/test_nat_matrix.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from lab.harness import Lab, bare, poll
from lab.nat import (
    MATRIX_AGENT_ENV,
    OVER_TCP,
    TCP_PORT,
    build_matrix,
    path_problem,
    peer_reports,
    start_matrix_relays,
)
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


def test_the_tcp_only_host_leaves_tcp_when_its_router_passes_udp_again(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    wiregate, ca_file, _ = start_matrix_relays(lab)
    hosts = build_matrix(lab, ["t1", "o1"])
    for name, value in MATRIX_AGENT_ENV.items():
        monkeypatch.setenv(name, value)
    key = wiregate.create_key()
    agents = {n: wiregate.start_agent(h, key, ca_file=ca_file) for n, h in hosts.items()}
    wiregate.wait_mesh(list(agents.values()), timeout=120)

    started = time.monotonic()

    def on_best_paths() -> dict[tuple[str, str], dict[str, Any]] | None:
        reports = peer_reports(wiregate, agents)
        wrong = [k for k, r in reports.items() if path_problem(*k, r) is not None]
        return reports if reports and not wrong else None

    reports = poll(on_best_paths, timeout=120, interval=1.0, what="t1 <-> o1 relayed, t1 over TCP")
    report = reports[("t1", "o1")]
    print(f"t1 -> o1 over TCP after {time.monotonic() - started:.1f} s: {report['reason']}")
    relay = report["relay"]
    table = (
        hosts["t1"]
        .run([*wiregate.cmd, "status", "--run-dir", str(agents["t1"].run_dir)], timeout=30)
        .stdout
    )
    assert f"relay:{relay}/tcp" in table, table
    assert f"why: UDP blocked on this network: {OVER_TCP} {relay}" in table, table
    router_wan = lab.routers["rt1"].wan_addr
    streams = lab.internet.run(["ss", "-Htn", "state", "established", "sport", f"= :{TCP_PORT}"])
    assert f"{router_wan}:" in streams.stdout, streams.stdout

    # -- the router passes UDP again: the pair leaves TCP (UDP relay, or direct)
    lab.routers["rt1"].run(["iptables", "-F", "FORWARD"])
    started = time.monotonic()

    def off_tcp() -> dict[str, Any] | None:
        report = peer_reports(wiregate, agents)[("t1", "o1")]
        return report if report.get("state") in ("relayed", "direct") else None

    report = poll(off_tcp, timeout=150, interval=1.0, what="t1 -> o1 to leave TCP")
    print(f"t1 -> o1 left TCP {time.monotonic() - started:.1f} s later: {report['reason']}")
    assert "TCP" not in report["reason"], report
    o1 = bare(wiregate.status(agents["o1"])["device"]["addresses"][0])
    t1 = bare(wiregate.status(agents["t1"])["device"]["addresses"][0])
    assert ping_until(hosts["t1"], o1, timeout=30), "t1 cannot reach o1 after leaving TCP"
    assert ping_until(hosts["o1"], t1, timeout=30), "o1 cannot reach t1 after leaving TCP"

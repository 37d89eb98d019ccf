"""A host behind a firewall that drops all UDP and lets only TCP 443 (and the gateway) out.

Host ``t1`` sits behind such a router; ``o1`` is an open host. Two relays (the
real ``wiregate relay``) listen for UDP and for TLS on 443, with certificates of a
lab CA that the agents trust (``--ca-file``); the gateway hands out their TCP
addresses with the tickets (``relay_tcp``). The pair must reach each
other across the tunnel, ``t1``'s status must say that the path is relayed over
TCP 443 via one of the relays and why (UDP blocked on this network), and once the router passes
UDP again the pair must leave TCP for the UDP relay or a direct path.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lab.harness import Agent, Lab, Wiregate, bare, poll
from lab.nat import (
    CONTROL_PORT,
    RELAY_HOSTS,
    STUN,
    relay_tcp_entries,
    start_gateway_with_relays,
    start_relays,
    tcp_only,
)
from lab.ping import ping_until
from lab.tls import LabCA

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


def report_of(wiregate: Wiregate, viewer: Agent, peer: str) -> dict[str, Any]:
    for entry in wiregate.status(viewer)["peers"]:
        if entry["name"] == peer:
            return dict(entry.get("path") or {})
    return {}


def test_a_tcp_only_host_reaches_its_peer_over_443_and_leaves_tcp_when_udp_returns(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREGATE_RELAY_TCP", json.dumps(relay_tcp_entries()))
    relays = [f"{rid}={host}:{CONTROL_PORT}" for rid, host in RELAY_HOSTS.items()]
    wiregate = start_gateway_with_relays(lab, monkeypatch, relays)
    monkeypatch.delenv("WIREGATE_RELAY_TCP")
    ca = LabCA.create(lab.workdir / "relay-ca")
    start_relays(lab, wiregate, tcp_ca=ca)
    router = lab.add_router("rt", nat="eim", block_udp=True)
    tcp_only(router)
    hosts = {"t1": lab.add_host("t1", behind=router), "o1": lab.add_host("o1")}
    for name, value in {
        "WIREGATE_STUN_SERVERS": json.dumps(STUN),
        "WIREGATE_PATH_PROBE_TIMEOUT": "3",
        "WIREGATE_RELAY_PING_INTERVAL": "1",
        "WIREGATE_NETCHECK_INTERVAL": "10",
    }.items():
        monkeypatch.setenv(name, value)
    key = wiregate.create_key()
    agents = {n: wiregate.start_agent(h, key, ca_file=ca.ca_file) for n, h in hosts.items()}
    wiregate.wait_mesh(list(agents.values()), timeout=120)

    started = time.monotonic()

    def on_tcp() -> dict[str, Any] | None:
        report = report_of(wiregate, agents["t1"], "o1")
        return report if report.get("state") == "relayed_tcp" else None

    report = poll(on_tcp, timeout=120, interval=1.0, what="t1 -> o1 relayed over TCP")
    print(f"t1 -> o1 over TCP after {time.monotonic() - started:.1f} s: {report['reason']}")
    relay = report["relay"]
    assert report["path"] == "relayed" and relay in RELAY_HOSTS
    assert report["reason"].startswith(
        f"UDP blocked on this network: relayed over TCP 443 via relay {relay}"
    )
    assert report_of(wiregate, agents["o1"], "t1")["path"] == "relayed"
    table = (
        hosts["t1"]
        .run([*wiregate.cmd, "status", "--run-dir", str(agents["t1"].run_dir)], timeout=30)
        .stdout
    )
    assert f"relay:{relay}/tcp" in table and "why: UDP blocked on this network: relayed" in table
    o1 = bare(wiregate.status(agents["o1"])["device"]["addresses"][0])
    t1 = bare(wiregate.status(agents["t1"])["device"]["addresses"][0])
    assert ping_until(hosts["t1"], o1, timeout=30), "t1 cannot reach o1 over TCP"
    assert ping_until(hosts["o1"], t1, timeout=30), "o1 cannot reach t1 over TCP"
    relay_tcp = lab.internet.run(["ss", "-Htn", "state", "established", "( sport = :443 )"])
    assert relay_tcp.stdout.strip(), "no TCP connection to the relay's 443"

    # -- the router passes UDP again: the pair leaves TCP (UDP relay, or direct)
    router.run(["iptables", "-F", "FORWARD"])
    started = time.monotonic()

    def off_tcp() -> dict[str, Any] | None:
        report = report_of(wiregate, agents["t1"], "o1")
        return report if report.get("state") in ("relayed", "direct") else None

    report = poll(off_tcp, timeout=150, interval=1.0, what="t1 -> o1 to leave TCP")
    print(f"t1 -> o1 left TCP {time.monotonic() - started:.1f} s later: {report['reason']}")
    assert "TCP" not in report["reason"]
    assert ping_until(hosts["t1"], o1, timeout=30), "t1 cannot reach o1 after leaving TCP"

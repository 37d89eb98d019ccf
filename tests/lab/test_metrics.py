"""Every process's /metrics for real: a gateway configured with one relay, that relay,
and two agents with ``metrics_listen`` — one on an open host, one behind a router
that blocks UDP except to the relay, so their pair is relayed. Each page is
scraped over HTTP inside its namespace and read with prometheus_client's parser.
"""

from __future__ import annotations

import json
import math

import pytest

from lab.harness import (
    INTERNET_GATEWAY,
    METRICS_PORT,
    Agent,
    Lab,
    Namespace,
    Process,
    Wiregate,
    poll,
)
from lab.metrics_text import Samples, parse
from lab.nat import CONTROL_PORT, RELAY_PORTS, allow_relays_only, start_gateway_with_relays
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

CONTROL = f"{INTERNET_GATEWAY}:{CONTROL_PORT}"
STUN = f"{INTERNET_GATEWAY}:3478"
RELAY_METRICS = "127.0.0.1:9191"
AGENT_METRICS = "127.0.0.1:9092"  # each agent in its own namespace: the same address


def scrape(ns: Namespace, address: str) -> Samples:
    page = ns.run(["curl", "-sf", "-m", "5", f"http://{address}/metrics"], timeout=10).stdout
    return parse(page)


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name}


def start_gateway(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Wiregate:
    return start_gateway_with_relays(lab, monkeypatch, [f"r1={CONTROL}"])


def start_relay(lab: Lab, wiregate: Wiregate) -> Process:
    signers = lab.internet.run(
        ["curl", "-sf", "-m", "5", f"{wiregate.server}/api/v1/relay/signers"], timeout=10
    ).stdout
    keys = lab.workdir / "relay-signers.json"
    keys.write_text(signers)
    first, last = RELAY_PORTS["r1"]
    relay = lab.internet.spawn(
        [*wiregate.cmd, "relay", "--stun-listen", STUN, "--relay-id", "r1",
         "--relay-listen", CONTROL, "--relay-ports", f"{first}-{last}",
         "--verify-keys-file", str(keys), "--metrics-listen", RELAY_METRICS,
         "--log-format", "json"],
        name="relay-r1",
    )  # fmt: skip
    poll(lambda: "relay listening" in relay.output(), timeout=20, what="relay r1")
    return relay


def relayed_with_handshake(wiregate: Wiregate, agents: list[Agent]) -> bool:
    for status in wiregate.statuses(agents).values():
        for peer in status["peers"]:
            if (peer.get("path") or {}).get("path") != "relayed" or not peer["last_handshake"]:
                return False
    return True


def test_metrics_of_gateway_relay_and_agents(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    wiregate = start_gateway(lab, monkeypatch)
    relay = start_relay(lab, wiregate)
    router = lab.add_router("rb1", nat="eim", block_udp=True)
    allow_relays_only(router)
    hosts = {"o1": lab.add_host("o1"), "b1": lab.add_host("b1", behind=router)}
    monkeypatch.setenv("WIREGATE_METRICS_LISTEN", AGENT_METRICS)
    monkeypatch.setenv("WIREGATE_STUN_SERVERS", json.dumps([STUN]))
    monkeypatch.setenv("WIREGATE_PATH_PROBE_TIMEOUT", "3")
    monkeypatch.setenv("WIREGATE_RELAY_PING_INTERVAL", "1")
    key = wiregate.create_key()
    agents = {name: wiregate.start_agent(host, key) for name, host in hosts.items()}
    wiregate.wait_mesh(list(agents.values()), timeout=120)
    poll(lambda: relayed_with_handshake(wiregate, list(agents.values())), timeout=90,
         what="the pair relayed, with a handshake")  # fmt: skip
    b1_v4 = wiregate.tunnel_addresses(agents["b1"])[0]
    assert ping_until(hosts["o1"], b1_v4), "no ping through the relayed tunnel"

    check_agents(agents, check_gateway(lab))
    check_relay(lab)
    assert relay.alive()


def check_agents(agents: dict[str, Agent], gateway_version: float) -> None:
    for name, agent in agents.items():
        s = scrape(agent.host, AGENT_METRICS)
        other = "b1" if name == "o1" else "o1"
        assert by_label(s, "wiregate_agent_peers", "path") == {
            "direct": 0, "relayed": 1, "probing": 0, "failed": 0, "unknown": 0,
        }, (name, s)  # fmt: skip
        labels = {"peer": other, "peer_id": peer_id(s, other)}
        age = one(s, "wiregate_agent_peer_handshake_age_seconds", **labels)
        assert not math.isinf(age) and 0 <= age < 180, (name, age)
        assert one(s, "wiregate_agent_peer_receive_bytes_total", **labels) > 0
        assert one(s, "wiregate_agent_peer_transmit_bytes_total", **labels) > 0
        assert one(s, "wiregate_agent_gateway_connected") == 1
        # an agent is sent only the changes it sees (its peers): it may hold an older version
        assert 2 <= one(s, "wiregate_agent_map_version") <= gateway_version
        assert one(s, "wiregate_agent_applies_total") >= 1
        assert one(s, "wiregate_agent_apply_failures_total") == 0
        assert one(s, "wiregate_agent_firewall_dropped_packets_total") == 0  # all may peer
        assert one(s, "wiregate_agent_peer_path", **labels, path="relayed") == 1


def peer_id(samples: Samples, name: str) -> str:
    ids = {dict(k).get("peer_id") for (n, k) in samples if dict(k).get("peer") == name}
    (found,) = ids - {None}
    assert found is not None
    return found


def check_gateway(lab: Lab) -> float:
    """The gateway's figures; returns the map version it holds."""
    s = scrape(lab.internet, f"{INTERNET_GATEWAY}:{METRICS_PORT}")
    assert one(s, "wiregate_broker_connected_agents") == 2
    assert one(s, "wiregate_relay_up", relay="r1") == 1
    assert 0 < one(s, "wiregate_relay_rtt_seconds", relay="r1") < 0.5
    assert one(s, "wiregate_enrollments_total", method="auth_key") == 2
    assert one(s, "wiregate_broker_fanout_seconds_count") >= 1
    return one(s, "wiregate_netmap_version")


def check_relay(lab: Lab) -> None:
    s = scrape(lab.internet, RELAY_METRICS)
    assert one(s, "wiregate_relay_allocations") == 1
    assert one(s, "wiregate_relay_allocations_created_total") >= 1
    assert one(s, "wiregate_relay_forwarded_bytes_total") > 0
    assert one(s, "wiregate_relay_datagrams_total", outcome="forwarded") > 0
    assert one(s, "wiregate_relay_datagrams_total", outcome="pinged") > 0
    assert one(s, "wiregate_stun_replies_total", family="ipv4", listener="3478") > 0
    assert one(s, "wiregate_relay_info", relay_id="r1") == 1

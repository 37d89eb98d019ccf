"""End to end: the nodes' own traffic (InternalIP to InternalIP) through the tunnel.

Lab cluster nodes (lab/cluster.py) run agents with ``host_traffic`` on; each node
advertises its InternalIP as a /32 route, which the policy approves for ``tag:node``.
A TCP listener in a node's host namespace stands in for the kubelet port. The API
server stand-in and the gateway live at 198.51.100.1, exempt from host traffic.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from lab.capture import parse_frame, read_pcap, start_capture
from lab.cluster import KUBE_API, Cluster, Node, tcp_exchange
from lab.harness import INTERNET_GATEWAY, WG_PORT, Agent, Host, Lab, Process, Wiregate, poll
from lab.tcp_listener import LISTENER

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

KUBELET = 10250
FRESH = "15"  # seconds: a peer silent this long is stale (the lab's short window)
POLICY = """\
acls:
  - {src: ["tag:node"], dst: ["tag:node"]}
routes:
  - tags: ["tag:node"]
    allow: ["10.244.0.0/16", "198.51.100.0/24"]
"""
HTTP_STATUS = """\
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError as exc:
    print(type(exc).__name__)
"""


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Wiregate:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    wiregate = Wiregate(lab)
    wiregate.gateway_env["WIREGATE_POLICY_FILE"] = str(policy)
    wiregate.start_gateway()
    return wiregate


def agent_env(mode: str) -> dict[str, str]:
    return {
        "WIREGATE_HOST_TRAFFIC": mode,
        "WIREGATE_HOST_TRAFFIC_FRESH": FRESH,
        "WIREGATE_HOST_TRAFFIC_EXEMPT": f'["{INTERNET_GATEWAY}/32"]',  # the API server
    }


def http_status(host: Host, url: str) -> str:
    return host.run([sys.executable, "-c", HTTP_STATUS, url], timeout=20).stdout.strip()


def assert_control_plane_reachable(
    node: Node, gateway: Wiregate, *, gateway_up: bool = True
) -> None:
    """The API server and the gateway: never routed into the tunnel, and answering."""
    route = node.host.run(["ip", "route", "get", INTERNET_GATEWAY]).stdout
    assert f"dev {node.host.ifname}" in route, route
    assert http_status(node.host, f"http://{KUBE_API}/api/v1/nodes") == "401"
    if gateway_up:
        assert http_status(node.host, f"{gateway.server}/readyz") == "200"


def host_state(gateway: Wiregate, agent: Agent, address: str) -> str | None:
    doc: dict[str, Any] = gateway.status(agent).get("host_traffic") or {}
    for d in doc.get("destinations", []):
        if d["address"] == f"{address}/32":
            return str(d["state"])
    return None


def wait_state(
    gateway: Wiregate, agent: Agent, address: str, state: str, timeout: float = 40
) -> None:
    poll(lambda: host_state(gateway, agent, address) == state or None, timeout=timeout,
         what=f"{address} {state} on {agent.host.name}")  # fmt: skip


def exchange_captured(src: Node, dst: Node, path: Path) -> tuple[str, list[Any]]:
    """``tcp_exchange`` src -> dst's kubelet port with src's underlay captured."""
    capture = start_capture(src.host, path)
    said = tcp_exchange(src.host, dst.host.addr, KUBELET)
    capture.stop(timeout=5)
    packets = [p for p in map(parse_frame, read_pcap(path)) if p is not None]
    return said, packets


def clear_kubelet(packets: list[Any]) -> list[Any]:
    return [p for p in packets if p.proto == 6 and KUBELET in (p.sport, p.dport)]


def only_wireguard_between(packets: list[Any], a: Node, b: Node) -> bool:
    """Every packet between the two nodes' InternalIPs is WireGuard UDP (and there are some)."""
    between = [p for p in packets if {p.src, p.dst} == {a.host.addr, b.host.addr}]
    return bool(between) and all(p.proto == 17 and WG_PORT in (p.sport, p.dport) for p in between)


def two_nodes(
    lab: Lab, gateway: Wiregate, mode: str, extra: int = 0
) -> tuple[Cluster, list[Node], list[Agent], Process]:
    cluster = Cluster(lab)
    nodes = [cluster.add_node(f"n{i + 1}") for i in range(2 + extra)]
    cluster.start()
    kubelet = nodes[0].host.spawn([sys.executable, "-c", LISTENER, str(KUBELET)], name="kubelet")
    poll(lambda: "listening" in kubelet.output(), timeout=20, what="the kubelet stand-in")
    key = gateway.create_key(tags="tag:node")
    agents = [cluster.start_agent(gateway, n, key, agent_env(mode)) for n in nodes[:2]]
    gateway.wait_mesh(agents, timeout=60)
    return cluster, nodes, agents, kubelet


def drop_tunnel(node: Node, agent: Agent) -> None:
    """The node's agent stops and its WireGuard interface goes with it (a dead node)."""
    assert agent.proc is not None
    agent.proc.stop()
    node.host.run(["ip", "link", "del", agent.iface], check=False)


def test_nonstrict_encrypts_node_traffic_and_falls_back_in_clear_counted(
    lab: Lab, gateway: Wiregate, tmp_path: Path
) -> None:
    _, (n1, n2), (a1, a2), _ = two_nodes(lab, gateway, "nonstrict")
    wait_state(gateway, a2, n1.host.addr, "encrypted")
    assert_control_plane_reachable(n2, gateway)

    said, packets = exchange_captured(n2, n1, tmp_path / "tunnel.pcap")
    assert said == "hello"
    assert clear_kubelet(packets) == [] and only_wireguard_between(packets, n1, n2)
    route = n2.host.run(["ip", "route", "get", n1.host.addr]).stdout
    assert f"dev {a2.iface}" in route, route

    drop_tunnel(n1, a1)
    wait_state(gateway, a2, n1.host.addr, "clear")
    said, packets = exchange_captured(n2, n1, tmp_path / "clear.pcap")
    assert said == "hello"  # the fallback: in clear, on purpose
    assert clear_kubelet(packets)
    doc = gateway.status(a2)["host_traffic"]
    assert doc["fallbacks"] >= 2  # the bootstrap (clear until the first handshake) and now
    assert_control_plane_reachable(n2, gateway)


def test_strict_never_in_clear_and_no_lock_out(lab: Lab, gateway: Wiregate, tmp_path: Path) -> None:
    cluster, (n1, n2, n3), (a1, a2), _ = two_nodes(lab, gateway, "strict", extra=1)
    wait_state(gateway, a2, n1.host.addr, "encrypted")
    said, packets = exchange_captured(n2, n1, tmp_path / "tunnel.pcap")
    assert said == "hello" and only_wireguard_between(packets, n1, n2)

    # a new node joins from nothing: it reaches the API server and the gateway to enroll
    key = gateway.create_key(tags="tag:node")
    a3 = cluster.start_agent(gateway, n3, key, agent_env("strict"))
    gateway.wait_mesh([a1, a2, a3], timeout=60)
    wait_state(gateway, a3, n1.host.addr, "encrypted")
    said, packets = exchange_captured(n3, n1, tmp_path / "joined.pcap")
    assert said == "hello" and only_wireguard_between(packets, n1, n3)
    assert_control_plane_reachable(n3, gateway)

    # a gateway outage: the tunnels stay (fail static), the API server stays reachable
    gateway.stop_gateway()
    assert tcp_exchange(n2.host, n1.host.addr, KUBELET) == "hello"
    assert_control_plane_reachable(n2, gateway, gateway_up=False)
    gateway.start_gateway()
    poll(lambda: gateway.status(a2)["gateway"]["connected"] or None, timeout=60,
         what="n2 back on the gateway")  # fmt: skip

    # the peer's tunnel gone: strict refuses rather than send in clear
    drop_tunnel(n1, a1)
    wait_state(gateway, a2, n1.host.addr, "held")
    said, packets = exchange_captured(n2, n1, tmp_path / "refused.pcap")
    assert said != "hello"
    assert clear_kubelet(packets) == []
    assert_control_plane_reachable(n2, gateway)

    # even with the tunnel table bypassed (flushed behind the agent's back), the filter
    # drops clear packets to the peer node, and counts them
    n2.host.run(["ip", "route", "flush", "table", "51820"])
    said, packets = exchange_captured(n2, n1, tmp_path / "bypassed.pcap")
    assert said != "hello" and clear_kubelet(packets) == []
    counter = n2.host.run(["nft", "list", "counter", "inet", "wiregate-host", "clear_out"]).stdout
    assert "packets 0 " not in counter, counter
    assert_control_plane_reachable(n2, gateway)

    # a revoked peer leaves the mesh: no longer a host destination, reached in clear
    ids = {p["name"]: p["id"] for p in gateway.status(a2)["peers"]}
    gateway.admin("devices", "remove", ids["n3"])
    poll(lambda: host_state(gateway, a2, n3.host.addr) is None or None, timeout=30,
         what="n3 gone from n2's host destinations")  # fmt: skip
    ping = n2.host.run(["ping", "-c", "1", "-W", "3", n3.host.addr], check=False)
    assert ping.returncode == 0, ping.stdout
    assert_control_plane_reachable(n3, gateway)  # the revoked node itself is not locked out

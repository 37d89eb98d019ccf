"""Host traffic throughput: node-to-node TCP through the tunnel against the same nodes in clear.

One lab cluster of two nodes (lab/cluster.py) whose agents run with
``host_traffic = strict``: every packet from ``n1`` to ``n2``'s InternalIP goes through
wireguard-go. The clear figure is measured on the same two nodes in the same run:
iperf3 to a second port whose packets both nodes mark with the agent's fwmark (an
nftables route chain), so the policy rule sends them by the main table, in clear,
exactly as WireGuard's own packets go. Runs alternate between the two paths; the
sending side (iperf3 client and its wireguard-go) is pinned to CPU 0 and the
receiving side to CPU 1 when there are two CPUs (as :mod:`benchmarks.tunnel` does).
``python -m benchmarks.host_tunnel`` prints one JSON object:

- ``host_tunnel_ratio``: the median over rounds of tunnel / clear, each round measuring
  both back to back (a report: wireguard-go bounds it here);
- ``host_tunnel_mbps``, ``host_clear_mbps``: median receiver throughput;
- ``host_tunnel_ratio_spread``: half the interquartile range of the per-round ratios;
- ``host_tunnel_rounds``, ``host_tunnel_pinned`` (1.0 when pinned).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.tunnel import (
    PIN,
    RECEIVER_CPU,
    SENDER_CPU,
    _on_cpu,
    pin_wireguard,
    semi_iqr,
)
from lab.cluster import Cluster
from lab.harness import Host, Lab, Wiregate, lab_requirements, poll

__all__ = ["run"]

TUNNEL_PORT, CLEAR_PORT = 5201, 5202
FWMARK = 0x5747  # the agent's default fwmark
POLICY = """\
acls:
  - {src: ["tag:node"], dst: ["tag:node"]}
routes:
  - tags: ["tag:node"]
    allow: ["10.244.0.0/16", "198.51.100.0/24"]
"""


def clear_by_mark(host: Host, match: str) -> None:
    """Mark ``host``'s TCP packets matching ``match`` (``dport 5202``) with the fwmark:
    routed by the main table, in clear."""
    script = (
        "table inet bench-clear {\n  chain out {\n"
        "    type route hook output priority -150; policy accept;\n"
        f"    tcp {match} meta mark set {FWMARK:#x}\n  }}\n}}\n"
    )
    host.run(["nft", "-f", "-"], input=script)


def iperf(client: Host, addr: str, port: int, seconds: int) -> float:
    cmd = _on_cpu(SENDER_CPU, ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J"])
    doc = json.loads(client.run(cmd, timeout=seconds + 30).stdout)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


def serve(host: Host, port: int) -> None:
    host.spawn(_on_cpu(RECEIVER_CPU, ["iperf3", "-s", "-p", str(port)]), name=f"iperf3-{port}")
    poll(lambda: f":{port} " in host.run(["ss", "-Hltn"]).stdout, timeout=10, what="iperf3")


def _nodes(lab: Lab, tmp: Path) -> tuple[Host, Host]:
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    wiregate = Wiregate(lab)
    wiregate.gateway_env["WIREGATE_POLICY_FILE"] = str(policy)
    wiregate.start_gateway()
    cluster = Cluster(lab)
    nodes = [cluster.add_node("n1"), cluster.add_node("n2")]
    cluster.start()
    key = wiregate.create_key(tags="tag:node")
    env = {"WIREGATE_HOST_TRAFFIC": "strict"}
    agents = [cluster.start_agent(wiregate, n, key, env) for n in nodes]
    wiregate.wait_mesh(agents, timeout=90)
    n1, n2 = nodes[0].host, nodes[1].host

    def encrypted() -> bool:
        doc = wiregate.status(agents[0]).get("host_traffic") or {}
        return any(d["state"] == "encrypted" for d in doc.get("destinations", []))

    poll(encrypted, timeout=60, what="n1's host traffic to n2 encrypted")
    return n1, n2


def _measure(lab: Lab, rounds: int, seconds: int) -> dict[str, list[float]]:
    n1, n2 = _nodes(lab, lab.workdir)
    route = n1.run(["ip", "route", "get", n2.addr]).stdout
    if f"dev {n1.wg_ifname}" not in route:
        raise RuntimeError(f"n2's InternalIP is not routed into the tunnel: {route}")
    clear_by_mark(n1, f"dport {CLEAR_PORT}")  # the data
    clear_by_mark(n2, f"sport {CLEAR_PORT}")  # and the ACKs: both ways in clear
    serve(n2, TUNNEL_PORT)
    serve(n2, CLEAR_PORT)
    pin_wireguard(n1, SENDER_CPU)
    pin_wireguard(n2, RECEIVER_CPU)
    results: dict[str, list[float]] = {"tunnel": [], "clear": []}
    order = [("tunnel", TUNNEL_PORT), ("clear", CLEAR_PORT)]
    for _ in range(rounds):
        for name, port in order:
            results[name].append(iperf(n1, n2.addr, port, seconds))
            time.sleep(0.5)
        order.reverse()
    return results


def run(rounds: int = 9, seconds: int = 3) -> dict[str, float]:
    """Build the lab, measure alternately ``rounds`` times, tear down; return the figures."""
    if reason := lab_requirements():
        raise RuntimeError(reason)
    with Lab() as lab:
        try:
            results = _measure(lab, rounds, seconds)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise
    paired = [t / c for t, c in zip(results["tunnel"], results["clear"], strict=True)]
    return {
        "host_tunnel_ratio": round(statistics.median(paired), 4),
        "host_tunnel_ratio_spread": round(semi_iqr(paired), 4),
        "host_tunnel_mbps": round(statistics.median(results["tunnel"]), 1),
        "host_clear_mbps": round(statistics.median(results["clear"]), 1),
        "host_tunnel_rounds": float(len(paired)),
        "host_tunnel_pinned": 1.0 if PIN else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="node-to-node TCP: tunnel vs clear")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    try:
        figures = run(args.rounds, args.seconds)
    except Exception as exc:
        print(f"host_tunnel benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

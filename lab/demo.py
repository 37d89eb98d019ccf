"""The demo's network paths: hosts behind hard networks, relays, and the status table.

``scripts/demo.py`` and ``tests/e2e/test_demo_paths.py`` share this: the hosts
that sit behind a symmetric NAT (two, each behind its own home router, so that the
pair of them can only meet through a relay) and one behind a firewall that lets
nothing out but TCP to the relays' port 443 and to the gateway (it reaches every
peer relayed over TCP); the gateway's relay settings and the two relays of
lab/nat.py (UDP and TLS on 443); waiting until every pair has settled on a path;
and the status table that prints, for every device, each peer's path and why — all
of it read from the agents' own ``wiregate status``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lab.harness import Agent, Host, Lab, Wiregate, bare
from lab.nat import CONTROL_PORT, RELAY_HOSTS, STUN, drop_unsolicited, relay_tcp_entries, tcp_only

__all__ = [
    "NAT_HOSTS",
    "SETTLED",
    "add_nat_hosts",
    "agent_environment",
    "path_label",
    "peer_paths",
    "status_table",
    "use_relays",
    "wait_paths",
]

# host -> (its router, what the router does): each behind a router of its own
NAT_HOSTS: dict[str, tuple[str, str]] = {
    "sierra": ("rsierra", "symmetric NAT"),
    "romeo": ("rromeo", "symmetric NAT"),
    "tango": ("rtango", "TCP-only firewall"),
}
SETTLED = ("direct", "relayed")  # path kinds that are an answer, not a search


def use_relays(wiregate: Wiregate) -> None:
    """Configure the (not yet started) gateway with the lab's two relays, over UDP and
    over TLS on 443 (start them with ``start_relays(lab, wiregate, tcp_ca=wiregate.ca)``)."""
    relays = [f"{rid}={host}:{CONTROL_PORT}" for rid, host in RELAY_HOSTS.items()]
    wiregate.gateway_env["WIREGATE_RELAYS"] = json.dumps(relays)
    wiregate.gateway_env["WIREGATE_RELAY_TCP"] = json.dumps(relay_tcp_entries())
    wiregate.gateway_env["WIREGATE_RELAY_PROBE_INTERVAL"] = "1"


def agent_environment() -> dict[str, str]:
    """Settings every demo agent runs with: the lab's STUN servers."""
    return {"WIREGATE_STUN_SERVERS": json.dumps(STUN)}


def add_nat_hosts(lab: Lab) -> dict[str, Host]:
    """The hosts of :data:`NAT_HOSTS`, each behind its own router: a symmetric NAT that
    drops unsolicited packets to itself, as home routers do; or a firewall that drops
    all UDP and lets only TCP to the relays' 443 and to the gateway out."""
    hosts = {}
    for name, (router_name, kind) in NAT_HOSTS.items():
        if kind == "symmetric NAT":
            router = lab.add_router(router_name, nat="symmetric")
            drop_unsolicited(router)
        else:
            router = lab.add_router(router_name, nat="eim", block_udp=True)
            tcp_only(router)
        hosts[name] = lab.add_host(name, behind=router)
    return hosts


def peer_paths(statuses: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(device, peer) -> the device's path report for that peer (``{}`` if it has none)."""
    return {
        (name, peer["name"]): dict(peer.get("path") or {})
        for name, status in statuses.items()
        for peer in status["peers"]
    }


def wait_paths(
    wiregate: Wiregate, agents: Sequence[Agent], timeout: float
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Poll every agent's status until each pair has settled on a path (direct or
    relayed) or ``timeout`` passes; (the last statuses, the pairs still unsettled)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = wiregate.statuses(agents)
        open_pairs = [
            f"{name}->{peer}: {report.get('path')} ({report.get('reason')})"
            for (name, peer), report in sorted(peer_paths(statuses).items())
            if report.get("path") not in SETTLED
        ]
        if not open_pairs or time.monotonic() > deadline:
            return statuses, open_pairs
        time.sleep(1.0)


def path_label(report: Mapping[str, Any]) -> str:
    """``direct``, ``relayed via r1``, ``relayed over TCP via r1``, or the search state."""
    path = str(report.get("path") or "unknown")
    if path != "relayed":
        return path
    over = " over TCP" if report.get("state") == "relayed_tcp" else ""
    relay = report.get("relay")
    return f"relayed{over}" + (f" via {relay}" if relay else "")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(timestamp: float | None, now: float) -> str:
    return f"{now - timestamp:.0f}s ago" if timestamp else "never"


def _nat(status: Mapping[str, Any]) -> str:
    netcheck = status.get("netcheck") or {}
    return str(netcheck.get("nat_type") or "not measured")


def status_table(statuses: Mapping[str, Mapping[str, Any]], now: float | None = None) -> str:
    """One block per device (its addresses, gateway link, NAT), then one line per peer:
    handshake age, bytes, the path and why — each field from ``wiregate status``."""
    now = time.time() if now is None else now
    header = f"{'DEVICE':<9} {'PEER':<9} {'HANDSHAKE':>10} {'RX':>10} {'TX':>10}  {'PATH':<24} WHY"
    lines = [header, "-" * (len(header) + 40)]
    for name, st in statuses.items():
        addrs = " ".join(bare(a) for a in st["device"]["addresses"])
        state = "connected" if st["gateway"]["connected"] else "DISCONNECTED"
        lines.append(
            f"{name:<9} {addrs}  (gateway {state}, map v{st['gateway']['map_version']};"
            f" NAT: {_nat(st)})"
        )
        for peer in st["peers"]:
            report = peer.get("path") or {}
            lines.append(
                f"{'':<9} {peer['name']:<9} {_age(peer['last_handshake'], now):>10} "
                f"{_size(peer['rx_bytes']):>10} {_size(peer['tx_bytes']):>10}  "
                f"{path_label(report):<24} {report.get('reason') or ''}"
            )
    return "\n".join(lines)

"""Two agents behind two EIM NAT routers reach each other directly, thanks to STUN.

Their own addresses are private LAN addresses the other cannot reach; with the
relay configured as STUN server each agent learns the reflexive address of its
WireGuard port, advertises it first, and the maps carry it. WireGuard's
handshakes from both sides then open the NAT pinholes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.harness import (
    INTERNET_GATEWAY,
    WG_PORT,
    Agent,
    Lab,
    Wiregate,
    bare,
    poll,
)
from lab.nat import drop_unsolicited, paths
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

STUN = f"{INTERNET_GATEWAY}:3478"
STUN_SECOND = "198.51.100.254"


def start_relay(lab: Lab, wiregate: Wiregate) -> None:
    lab.internet.run(["ip", "addr", "add", f"{STUN_SECOND}/24", "dev", "br0"])
    relay = lab.internet.spawn(
        [*wiregate.cmd, "relay", "--stun-listen", STUN, "--stun-listen", f"{STUN_SECOND}:3479",
         "--metrics-listen", "127.0.0.1:9091"],
        name="relay",
    )  # fmt: skip
    poll(lambda: "relay listening" in relay.output(), timeout=20, what="relay to listen")


def map_endpoints(agent: Agent) -> dict[str, list[str]]:
    """Peer name -> endpoints, from the agent's cached map."""
    doc = json.loads((agent.state_dir / "netmap.json").read_text())
    peers: Any = doc.get("peers", [])
    items = peers.values() if isinstance(peers, dict) else peers
    return {p["name"]: list(p.get("endpoints", [])) for p in items}


def test_two_eim_nats_go_direct(
    lab: Lab, gateway: Wiregate, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_relay(lab, gateway)
    routers = {name: lab.add_router(f"r{name}", nat="eim") for name in ("a", "b")}
    for router in routers.values():
        drop_unsolicited(router)
    hosts = {name: lab.add_host(name, behind=router) for name, router in routers.items()}
    monkeypatch.setenv("WIREGATE_STUN_SERVERS", json.dumps([STUN]))
    key = gateway.create_key()
    agents = {name: gateway.start_agent(host, key) for name, host in hosts.items()}
    wan = {name: f"{r.wan_addr}:{WG_PORT}" for name, r in routers.items()}

    def reflexive_in_maps() -> bool:
        try:
            seen = {n: map_endpoints(a) for n, a in agents.items()}
        except (OSError, ValueError):
            return False
        return (
            seen["a"].get("b", [None])[0] == wan["b"] and seen["b"].get("a", [None])[0] == wan["a"]
        )

    poll(reflexive_in_maps, timeout=90, interval=0.5, what="reflexive endpoints in both maps")
    statuses = gateway.wait_mesh(list(agents.values()), timeout=60)
    assert statuses["a"]["netcheck"]["nat_type"] == "eim"
    assert statuses["a"]["netcheck"]["reflexive"] == wan["a"]
    addr_b = bare(statuses["b"]["device"]["addresses"][0])
    if not ping_until(hosts["a"], addr_b, timeout=30):
        pytest.fail(f"no direct path:\n{paths(list(routers.values()), list(hosts.values()))}")
    live = {p["name"]: p for p in gateway.status(agents["a"])["peers"]}
    assert live["b"]["endpoint"] == wan["b"]  # direct, to b's NAT mapping
    assert live["b"]["last_handshake"]

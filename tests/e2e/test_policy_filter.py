"""End to end: a policy file decides who peers, and the receiving agent's nftables enforce ports.

Three agents enrolled with keys tagged ``tag:a``, ``tag:b`` and ``tag:c`` and
the policy::

    acls:
      - {src: [tag:a], dst: [tag:b], ports: ["tcp:5432", "icmp"]}
      - {src: [tag:c], dst: [tag:b]}

A reaches B on tcp:5432 and ICMP only; C never peers with A; B may open nothing
on A (replies to A's own connections still pass).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab.harness import Agent, Host, Lab, Wiregate, bare, poll
from lab.tcp_listener import LISTENER

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]

POLICY = """\
acls:
  - {src: ["tag:a"], dst: ["tag:b"], ports: ["tcp:5432", "icmp"]}
  - {src: ["tag:c"], dst: ["tag:b"]}
"""

# Accepts on every address of the namespace, on each port given, and says "hello".
# Prints "open" (and what the server said), "refused" or "timeout".
CLIENT = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        print("open", s.recv(16).decode())
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timeout")
"""


def connect(host: Host, addr: str, port: int) -> str:
    return host.run([sys.executable, "-c", CLIENT, addr, str(port)], timeout=20).stdout.strip()


def dropped(host: Host) -> int:
    """Packets counted by the agent's ``dropped`` counter in ``host``'s namespace."""
    out = host.run(["nft", "-j", "list", "counter", "inet", "wiregate", "dropped"]).stdout
    counters = [item["counter"] for item in json.loads(out)["nftables"] if "counter" in item]
    return int(counters[0]["packets"])


def peers_by_name(wiregate: Wiregate, agents: dict[str, Agent]) -> dict[str, dict[str, Any]]:
    statuses = wiregate.statuses(list(agents.values()))
    names = {st["device"].get("id"): name for name, st in statuses.items()}
    return {
        name: {
            "connected": st["gateway"]["connected"],
            "peers": {names.get(p["id"], p["id"]) for p in st["peers"]},
            "status": st,
        }
        for name, st in statuses.items()
    }


def test_policy_decides_peers_and_the_filter_enforces_ports(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("WIREGATE_POLICY_FILE", str(policy))  # the gateway reads it at start
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    hosts = {name: lab.add_host(name) for name in ("a", "b", "c")}
    agents = {
        name: wiregate.start_agent(host, wiregate.create_key(tags=f"tag:{name}"))
        for name, host in hosts.items()
    }
    want = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}

    def settled() -> dict[str, dict[str, Any]] | None:
        view = peers_by_name(wiregate, agents)
        ok = all(v["connected"] and v["peers"] == want[n] for n, v in view.items())
        return view if ok else None

    view = poll(settled, timeout=90, interval=0.5, what="the policy's peers on every agent")
    assert "c" not in view["a"]["peers"] and "a" not in view["c"]["peers"]
    for name, v in view.items():
        assert v["status"]["problems"] == [], name  # nft is there: the filter is enforced

    a, b = hosts["a"], hosts["b"]
    b_v4, b_v6 = (bare(x) for x in view["b"]["status"]["device"]["addresses"])
    a_v4 = bare(view["a"]["status"]["device"]["addresses"][0])
    table = b.run(["nft", "list", "table", "inet", "wiregate"]).stdout
    assert f'iifname "{agents["b"].iface}" jump from_tunnel' in table
    assert "ip saddr . meta l4proto . th dport @port4 accept" in table
    assert f"{a_v4} . tcp . 5432" in table  # A's allowance, an element of the set

    listener = b.spawn([sys.executable, "-c", LISTENER, "5432", "22"], name="listener-b")
    poll(lambda: "listening" in listener.output(), timeout=15, what="the listener on b")
    deadline = time.monotonic() + 20
    while not a.ping(b_v4, count=1, timeout=1.0):  # the first handshake takes a moment
        assert time.monotonic() < deadline, "A could not ping B over the tunnel"
    assert a.ping(b_v6, count=1, timeout=2.0)

    assert connect(a, b_v4, 5432) == "open hello"
    assert connect(a, b_v6, 5432) == "open hello"
    before = dropped(b)
    assert connect(a, b_v4, 22) == "timeout"  # dropped by B's filter, not refused
    assert dropped(b) > before

    # B may open nothing on A: its ping is dropped by A's filter; C cannot reach A at all.
    a_before = dropped(a)
    assert not b.ping(a_v4, count=2, timeout=2.0)
    assert dropped(a) > a_before
    assert not hosts["c"].ping(a_v4, count=1, timeout=2.0)

    # A revoked agent tears down its interface and removes its table.
    wiregate.admin("devices", "remove", view["b"]["status"]["device"]["id"])

    def table_gone() -> bool | None:
        return True if "wiregate" not in b.run(["nft", "list", "tables"]).stdout else None

    poll(table_gone, timeout=30, what="B's table to be removed on teardown")

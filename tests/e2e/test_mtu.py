"""MTU 1280 somewhere along the underlay: the agents probe each tunnel's path MTU,
clamp TCP's MSS to it, and a 20 MB TCP transfer across the tunnel completes in
both directions at the speed it has without the narrow hop.

Topology: ``a`` on the internet, ``b`` behind the plain router ``r`` whose WAN
veth has MTU 1280. Both agents see a 1500-byte local underlay (tunnel MTU 1440),
so only probing finds the hop. It fails differently in each direction:

* ``b`` → ``a``: ``r`` routes out of its 1280 WAN link and answers oversized
  packets with ICMP "fragmentation needed" (frag-needed seen by ``b``);
* ``a`` → ``b``: the oversized frame is dropped silently by ``r``'s WAN veth
  (a black hole seen by ``a``: probes above some size are lost).

``r`` clamps the MSS of underlay TCP (the control connection to the gateway)
the way a router with a narrow link would; the tunnel's UDP is untouched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from lab.harness import Agent, Host, Lab, Wiregate, bare, poll
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]

NARROW = 1280
TOTAL = 20 * 1024 * 1024
PORT = 5201

RECEIVER = """
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    got = 0
    while chunk := conn.recv(1 << 16):
        got += len(chunk)
    conn.sendall(str(got).encode())
    conn.close()
"""

SENDER = """
import socket, sys, time
total = int(sys.argv[3])
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
block = b"x" * (1 << 16)
start = time.monotonic()
sent = 0
while sent < total:
    conn.sendall(block)
    sent += len(block)
conn.shutdown(socket.SHUT_WR)
ack = conn.recv(64)
print(int(ack), time.monotonic() - start, conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
"""


def transfer(src: Host, dst_addr: str, script: Path) -> tuple[int, float, int]:
    """Send ``TOTAL`` bytes from ``src`` to the receiver at ``dst_addr``: (bytes acked,
    seconds, the sender's MSS)."""
    out = src.run(["python3", str(script), dst_addr, str(PORT), str(TOTAL)], timeout=90).stdout
    got, seconds, mss = out.split()
    return int(got), float(seconds), int(mss)


def peer_of(status: dict[str, Any]) -> dict[str, Any]:
    [peer] = status["peers"]
    return peer


def tunnel_state(gateway: Wiregate, agents: dict[str, Agent]) -> str:
    """What each side's WireGuard and path machine say, for a failure message."""
    lines = []
    for name, agent in agents.items():
        wg = agent.host.run(["wg", "show", agent.iface], check=False).stdout
        peer = peer_of(gateway.status(agent))
        path, pmtu = peer.get("path"), peer.get("pmtu")
        lines.append(f"{name}: {wg.strip()}\n{name} path: {path} pmtu: {pmtu}")
    return "\n".join(lines)


def test_narrow_hop_is_probed_clamped_and_carries_full_speed(lab: Lab) -> None:
    gateway = Wiregate(lab)
    gateway.start_gateway()
    router = lab.add_router("r", nat="none")
    a, b = lab.add_host("a"), lab.add_host("b", behind=router)
    router.run(["ip", "link", "set", router.wan_ifname, "mtu", str(NARROW)])
    router.run(["iptables", "-t", "mangle", "-A", "FORWARD", "-p", "tcp", "--tcp-flags",
                "SYN,RST", "SYN", "-j", "TCPMSS", "--clamp-mss-to-pmtu"])  # fmt: skip

    key = gateway.create_key()
    agents = {h.name: gateway.start_agent(h, key) for h in (a, b)}
    statuses = gateway.wait_mesh(list(agents.values()), timeout=90)
    addr = {name: bare(st["device"]["addresses"][0]) for name, st in statuses.items()}
    for src, dst in ((a, "b"), (b, "a")):  # small packets pass
        assert ping_until(src, addr[dst]), f"{src.name} -> {dst}:\n{tunnel_state(gateway, agents)}"

    def probed() -> dict[str, dict[str, Any]] | None:
        docs = gateway.statuses(list(agents.values()))
        done = all(peer_of(d).get("pmtu") is not None for d in docs.values())
        return docs if done else None

    docs = poll(probed, timeout=90, interval=1.0, what="both agents to probe the path MTU")
    mtus = {name: peer_of(doc)["path_mtu"] for name, doc in docs.items()}
    counters = {name: doc["pmtu"] for name, doc in docs.items()}
    print("path MTU", mtus, "counters", counters)
    limit = NARROW - 60  # the 1280 hop minus WireGuard over IPv4
    assert mtus["a"] is not None and 1000 <= mtus["a"] <= limit
    assert mtus["b"] is not None and 1000 <= mtus["b"] <= limit
    assert counters["a"]["black_holes"] >= 1  # a's oversized probes vanish without ICMP
    assert counters["b"]["frag_needed"] >= 1  # b's draw ICMP fragmentation-needed from r
    text = b.run([*gateway.cmd, "status", "--run-dir", str(agents["b"].run_dir)]).stdout
    assert f"path MTU {mtus['b']}" in text

    receiver, sender = lab.workdir / "receiver.py", lab.workdir / "sender.py"
    receiver.write_text(RECEIVER)
    sender.write_text(SENDER)
    for host in (a, b):
        proc = host.spawn(["python3", str(receiver), addr[host.name], str(PORT)])
        poll(lambda p=proc: "listening" in p.output(), timeout=15, what="the receiver")

    narrow = {"a->b": transfer(a, addr["b"], sender), "b->a": transfer(b, addr["a"], sender)}
    router.run(["ip", "link", "set", router.wan_ifname, "mtu", "1500"])
    time.sleep(0.5)
    wide = {"a->b": transfer(a, addr["b"], sender), "b->a": transfer(b, addr["a"], sender)}
    print("narrow (bytes, s, mss)", narrow, "wide", wide)
    for direction in narrow:
        got, seconds, mss = narrow[direction]
        assert got == TOTAL, f"{direction}: only {got} of {TOTAL} bytes arrived"
        assert mss <= limit - 40, f"{direction}: MSS {mss} not clamped to the path MTU"
        assert wide[direction][0] == TOTAL
        rate, base = TOTAL / seconds, TOTAL / wide[direction][1]
        assert rate >= base / 3, f"{direction}: {rate / 1e6:.1f} MB/s vs {base / 1e6:.1f} MB/s"

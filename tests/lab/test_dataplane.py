"""The data plane for real: two network namespaces joined by a veth, wireguard-go in each.

Each namespace runs a small agent process (``ip netns exec NS python -c NODE``)
that holds one DataPlane and takes JSON commands on stdin, so that its memory
of the last apply persists between applies, as in the daemon.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]

if os.geteuid() != 0:
    pytest.skip("the data plane lab needs root (network namespaces)", allow_module_level=True)
if shutil.which("wireguard-go") is None:
    pytest.skip("wireguard-go is not installed", allow_module_level=True)

NODE = r"""
import base64, json, sys, time
from dataclasses import asdict
from pathlib import Path
from agent.dataplane.facade import DataPlane
from wiregate.mapwire import read_full
cfg = json.loads(sys.stdin.readline())
skew = [0.0]  # the test moves this node's clock forward with {"op": "tick"}
dp = DataPlane(interface=cfg["interface"], private_key=base64.b64decode(cfg["key"]),
               listen_port=cfg["port"], fwmark=0xCA6C, table=51820, rule_priority=5210,
               backend="auto", run_dir=Path(cfg["run_dir"]), resync_interval=60.0,
               clock=lambda: time.monotonic() + skew[0])
print(json.dumps({"ok": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "setup":
            dp.setup(); out = {"backend": dp.backend_name}
        elif cmd["op"] == "apply":
            r = dp.apply(read_full(cmd["map"]))
            out = {"writes": r.writes, "problems": list(r.problems), "peers": r.peers}
        elif cmd["op"] == "status":
            out = {"peers": [asdict(p) for p in dp.status()]}
        elif cmd["op"] == "teardown":
            dp.teardown(); out = {}
        elif cmd["op"] == "tick":
            skew[0] += cmd["seconds"]; out = {}
        print(json.dumps({"ok": True, **out}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


@dataclass
class Node:
    ns: str
    iface: str
    underlay: str
    tunnel4: str
    tunnel6: str
    private: bytes
    proc: subprocess.Popen[str] | None = None

    @property
    def public(self) -> str:
        return encode_key(public_from_private(self.private))

    def start(self, run_dir: Path) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", NODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        key = base64.b64encode(self.private).decode()
        self.call({"interface": self.iface, "key": key, "port": 51820, "run_dir": str(run_dir)})

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        assert reply.pop("ok"), reply
        return reply

    def as_peer(self, other_underlay: bool = True) -> dict[str, Any]:
        return {
            "id": self.ns,
            "name": self.ns,
            "public_key": self.public,
            "addresses": [f"{self.tunnel4}/32", f"{self.tunnel6}/128"],
            "allowed_ips": [f"{self.tunnel4}/32", f"{self.tunnel6}/128"],
            "endpoints": [f"{self.underlay}:51820"] if other_underlay else [],
            "keepalive": None,
            "tags": [],
        }

    def netmap(self, version: int, peers: list[dict[str, Any]]) -> dict[str, Any]:
        me = self.as_peer()
        return {
            "type": "full",
            "version": version,
            "self": {k: me[k] for k in ("id", "name", "public_key", "addresses")},
            "peers": peers,
        }


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    tag = secrets.token_hex(3)
    a = Node(
        f"wgdpa{tag}",
        f"wgda{tag}",
        "192.0.2.1",
        "100.64.0.1",
        "fd7a:7767:6174::1",
        generate_private_key(),
    )
    b = Node(
        f"wgdpb{tag}",
        f"wgdb{tag}",
        "192.0.2.2",
        "100.64.0.2",
        "fd7a:7767:6174::2",
        generate_private_key(),
    )
    try:
        _make_namespaces(a, b, tag)
        a.start(tmp_path / "a")
        b.start(tmp_path / "b")
        yield a, b
    finally:
        for node in (a, b):
            _stop(node, tmp_path)


def _make_namespaces(a: Node, b: Node, tag: str) -> None:
    for node in (a, b):
        sh("ip", "netns", "add", node.ns)
        sh("ip", "-n", node.ns, "link", "set", "lo", "up")
    sh(
        "ip",
        "link",
        "add",
        f"va{tag}",
        "netns",
        a.ns,
        "type",
        "veth",
        "peer",
        "name",
        f"vb{tag}",
        "netns",
        b.ns,
    )
    for node, veth in ((a, f"va{tag}"), (b, f"vb{tag}")):
        sh("ip", "-n", node.ns, "addr", "add", f"{node.underlay}/24", "dev", veth)
        sh("ip", "-n", node.ns, "link", "set", veth, "up")


def _stop(node: Node, tmp_path: Path) -> None:
    if node.proc is not None:
        node.proc.kill()
        node.proc.wait()
    side = "a" if node.ns.startswith("wgdpa") else "b"
    pid_file = tmp_path / side / f"{node.iface}.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and node.iface.encode() in cmdline.read_bytes():
            os.kill(pid, 9)
    sh("ip", "netns", "del", node.ns, check=False)
    Path(f"/var/run/wireguard/{node.iface}.sock").unlink(missing_ok=True)


def ping(node: Node, address: str) -> bool:
    result = sh(
        "ip",
        "netns",
        "exec",
        node.ns,
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        address,
        check=False,
    )
    return result.returncode == 0


def table(node: Node, family: str = "-4") -> str:
    return sh("ip", family, "-n", node.ns, "route", "show", "table", "51820").stdout


def handshakes(node: Node) -> dict[str, float | None]:
    return {p["public_key"]: p["last_handshake"] for p in node.call({"op": "status"})["peers"]}


def test_tunnel_noop_remove_and_refusal(lab: tuple[Node, Node]) -> None:
    a, b = lab
    assert a.call({"op": "setup"})["backend"] == "userspace"
    assert b.call({"op": "setup"})["backend"] == "userspace"
    map_a = a.netmap(1, [b.as_peer()])
    first = a.call({"op": "apply", "map": map_a})
    assert first["writes"] > 0 and first["problems"] == [] and first["peers"] == 1
    b.call({"op": "apply", "map": b.netmap(1, [a.as_peer()])})

    assert ping(a, b.tunnel4), "IPv4 ping across the tunnel"
    assert ping(a, b.tunnel6), "IPv6 ping across the tunnel"
    before = handshakes(a)[b.public]
    assert before is not None

    again = a.call({"op": "apply", "map": map_a})
    assert again["writes"] == 0
    assert handshakes(a)[b.public] == before

    # a third peer comes and goes: its routes go with it
    ghost = Node(
        "ghost", "-", "192.0.2.3", "100.64.0.3", "fd7a:7767:6174::3", generate_private_key()
    )
    a.call({"op": "apply", "map": a.netmap(2, [b.as_peer(), ghost.as_peer()])})
    assert "100.64.0.3" in table(a) and "fd7a:7767:6174::3" in table(a, "-6")
    removed = a.call({"op": "apply", "map": map_a})
    assert removed["writes"] > 0 and removed["peers"] == 1
    assert "100.64.0.3" not in table(a) and "fd7a:7767:6174::3" not in table(a, "-6")
    assert ghost.public not in handshakes(a)

    # invalid peers are refused, the valid one stays
    zero = dict(ghost.as_peer(), id="zero", public_key=base64.b64encode(bytes(32)).decode())
    default = dict(ghost.as_peer(), id="default", allowed_ips=["0.0.0.0/0"])
    bad = a.call({"op": "apply", "map": a.netmap(3, [b.as_peer(), zero, default])})
    assert bad["peers"] == 1 and len(bad["problems"]) == 2, bad
    assert any("zero" in p for p in bad["problems"])
    assert any("default route" in p for p in bad["problems"])
    assert bad["writes"] == 0
    assert ping(a, b.tunnel4)
    assert "default" not in table(a)


def test_restart_adopts_running_tunnel(lab: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = lab
    a.call({"op": "setup"})
    b.call({"op": "setup"})
    map_a = a.netmap(1, [b.as_peer()])
    a.call({"op": "apply", "map": map_a})
    b.call({"op": "apply", "map": b.netmap(1, [a.as_peer()])})
    assert ping(a, b.tunnel4)
    before = handshakes(a)[b.public]
    # the agent process dies; a new one adopts wireguard-go without restarting it
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait()
    a.start(tmp_path / "a")
    assert a.call({"op": "setup"})["backend"] == "userspace"
    assert a.call({"op": "apply", "map": map_a})["writes"] == 0
    assert handshakes(a)[b.public] == before
    assert ping(a, b.tunnel4)
    a.call({"op": "teardown"})
    assert not Path(f"/var/run/wireguard/{a.iface}.sock").exists()
    assert "5210" not in sh("ip", "-n", a.ns, "rule").stdout
    time.sleep(0.1)


def test_out_of_band_changes_are_repaired_at_the_periodic_resync(lab: tuple[Node, Node]) -> None:
    a, b = lab
    a.call({"op": "setup"})
    b.call({"op": "setup"})
    map_a = a.netmap(1, [b.as_peer()])
    a.call({"op": "apply", "map": map_a})
    b.call({"op": "apply", "map": b.netmap(1, [a.as_peer()])})
    assert ping(a, b.tunnel4)
    # behind the agent's back: the peer and one of its routes go away
    sh("ip", "netns", "exec", a.ns, "wg", "set", a.iface, "peer", b.public, "remove")
    sh("ip", "-n", a.ns, "route", "del", f"{b.tunnel4}/32", "dev", a.iface, "table", "51820")
    assert a.call({"op": "apply", "map": map_a})["writes"] == 0  # trusted until the resync
    assert b.public not in handshakes(a)
    a.call({"op": "tick", "seconds": 60})
    repaired = a.call({"op": "apply", "map": map_a})
    assert repaired["writes"] == 2, repaired  # one UAPI transaction, one route
    assert b.public in handshakes(a) and b.tunnel4 in table(a)
    assert ping(a, b.tunnel4)
    before = handshakes(a)[b.public]
    a.call({"op": "tick", "seconds": 60})
    assert a.call({"op": "apply", "map": map_a})["writes"] == 0  # a clean resync writes nothing
    assert handshakes(a)[b.public] == before

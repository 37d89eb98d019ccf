"""The packet filter's sets in the real kernel: packets judged, one change = element operations,
drift repaired.

Two throwaway namespaces joined by a veth; ``f`` runs a small process holding one
:class:`~agent.dataplane.firewall.Firewall` on its veth end (the filter judges
whatever arrives on the interface it is given, as it does on the WireGuard one)
through libnftables, and records each script it runs. ``c`` connects from its
addresses (an address of its own, and one inside a prefix it "advertises").
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.tcp_listener import CLIENT, LISTENER

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]

if os.geteuid() != 0:
    pytest.skip("the firewall lab needs root (network namespaces)", allow_module_level=True)
if shutil.which("nft") is None:
    pytest.skip("nftables is not installed", allow_module_level=True)

NODE = r"""
import json, sys
from agent.dataplane.firewall import Firewall
from wiregate.mapwire import read_full
from wiregate.nft import Nft

class Recording(Nft):
    scripts = []
    def run(self, script):
        Recording.scripts.append(script)
        super().run(script)

fw = Firewall(sys.argv[1], Recording())
for line in sys.stdin:
    cmd = json.loads(line)
    before = len(Recording.scripts)
    if cmd["op"] == "apply":
        fw.path_mtu = cmd.get("path_mtu", {})
        problems = fw.apply(read_full(cmd["map"]), repair=cmd.get("repair", False))
    else:
        fw.teardown(); problems = ()
    out = {"problems": list(problems), "scripts": Recording.scripts[before:]}
    print(json.dumps(out), flush=True)
"""

# Accepts on the given TCP ports (IPv4 and IPv6) and says "hello".
# Accepts one connection on port 9000 and prints the MSS it will send with (the peer's MSS).
MSS_SERVER = """\
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen()
print("listening", flush=True)
conn, _ = s.accept()
print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
"""

# Connects to port 9000 advertising an MSS of argv[2] (0: the route's).
MSS_CLIENT = """\
import socket, sys
s = socket.socket()
if int(sys.argv[2]):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, int(sys.argv[2]))
s.bind(("100.64.0.2", 0))
s.connect((sys.argv[1], 9000))
s.close()
"""


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


class Lab:
    def __init__(self, tag: str) -> None:
        self.f, self.c, self.vf = f"fwf{tag}", f"fwc{tag}", f"vf{tag}"
        self.proc: subprocess.Popen[str] | None = None
        self.listener: subprocess.Popen[str] | None = None

    def build(self) -> None:
        for ns in (self.f, self.c):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "link",
            "add",
            self.vf,
            "netns",
            self.f,
            "type",
            "veth",
            "peer",
            "vc",
            "netns",
            self.c,
        )
        for ns, dev, addrs in (
            (self.f, self.vf, ["100.64.0.1/16", "fd7a::1/64"]),
            (self.c, "vc", ["100.64.0.2/16", "10.77.0.5/16", "fd7a::2/64"]),
        ):
            for addr in addrs:
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.f, "route", "add", "10.77.0.0/16", "dev", self.vf)
        # WireGuard links have no neighbour discovery; on a veth the filter would drop it
        for ns, dev, other, peer_dev, addr in (
            (self.f, self.vf, self.c, "vc", "fd7a::2"),
            (self.c, "vc", self.f, self.vf, "fd7a::1"),
        ):
            mac = json.loads(sh("ip", "-n", other, "-j", "link", "show", peer_dev))[0]["address"]
            sh("ip", "-n", ns, "-6", "neigh", "replace", addr, "lladdr", mac, "dev", dev,
               "nud", "permanent")  # fmt: skip
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.f, sys.executable, "-c", NODE, self.vf],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self.listener = subprocess.Popen(
            ["ip", "netns", "exec", self.f, sys.executable, "-c", LISTENER, "22", "5432", "8080"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.listener.stdout is not None
        assert self.listener.stdout.readline().strip() == "listening"

    def apply(
        self,
        filter: list[str] | None,
        *,
        repair: bool = False,
        version: int = 1,
        path_mtu: int | None = None,
    ) -> Any:
        peer = {
            "id": "c", "name": "c", "public_key": "A" * 43 + "=",
            "addresses": ["100.64.0.2/32", "fd7a::2/128"],
            "allowed_ips": ["100.64.0.2/32", "fd7a::2/128", "10.77.0.0/16"],
            "endpoints": [], "keepalive": None, "tags": [], "filter": filter,
        }  # fmt: skip
        me = {"id": "f", "name": "f", "public_key": "B" * 43 + "=", "addresses": ["100.64.0.1/32"]}
        doc = {"version": version, "self": me, "peers": [peer]}
        mtus = {} if path_mtu is None else {peer["public_key"]: path_mtu}
        return self.call({"op": "apply", "map": doc, "repair": repair, "path_mtu": mtus})

    def call(self, cmd: dict[str, Any]) -> Any:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        while not (line := self.proc.stdout.readline()).startswith("{"):  # log lines
            assert line, "the firewall process ended"
        return json.loads(line)

    def connect(self, source: str, port: int) -> str:
        target = "fd7a::1" if ":" in source else "100.64.0.1"
        cmd = [sys.executable, "-c", CLIENT, source, target, str(port)]
        return sh("ip", "netns", "exec", self.c, *cmd).strip()

    def mss_seen(self, advertised: int) -> int:
        """The MSS ``f`` sees on a connection from ``c`` that advertised ``advertised``."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.f, sys.executable, "-c", MSS_SERVER],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "listening"
            cmd = [sys.executable, "-c", MSS_CLIENT, "100.64.0.1", str(advertised)]
            sh("ip", "netns", "exec", self.c, *cmd)
            return int(server.stdout.readline())
        finally:
            server.kill()
            server.wait()

    def nft(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.f, "nft", *args)

    def dropped(self) -> int:
        doc = json.loads(self.nft("-j", "list", "counter", "inet", "wiregate", "dropped"))
        return int(next(i["counter"]["packets"] for i in doc["nftables"] if "counter" in i))

    def close(self) -> None:
        for proc in (self.proc, self.listener):
            if proc is not None:
                proc.kill()
                proc.wait()
        for ns in (self.f, self.c):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(secrets.token_hex(3))
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def test_packets_follow_the_sets_and_a_change_is_element_operations(lab: Lab) -> None:
    first = lab.apply(["tcp:5432", "tcp:8000-8099"], repair=True)
    assert first["problems"] == [] and "table inet wiregate {" in first["scripts"][0]
    assert lab.connect("100.64.0.2", 5432) == "open"
    assert lab.connect("fd7a::2", 5432) == "open"
    assert lab.connect("10.77.0.5", 8080) == "open"  # a prefix source and a port range
    before = lab.dropped()
    assert lab.connect("100.64.0.2", 22) == "timeout"  # dropped, not refused
    assert lab.dropped() > before

    change = lab.apply(["tcp:22"], version=2)
    [script] = change["scripts"]
    assert "table" not in script.replace("inet wiregate", "")  # elements only
    assert script.startswith("delete element inet wiregate port4 {")
    assert lab.connect("100.64.0.2", 22) == "open"
    assert lab.connect("100.64.0.2", 5432) == "timeout"
    assert lab.connect("10.77.0.5", 8080) == "timeout"

    assert lab.apply(None, version=3)["problems"] == []  # open: everything
    assert lab.connect("fd7a::2", 5432) == "open" and lab.connect("10.77.0.5", 22) == "open"
    assert lab.apply(None, version=3)["scripts"] == []  # unchanged: nothing written


def test_a_repair_restores_drifted_elements_and_a_tampered_table(lab: Lab) -> None:
    lab.apply(["tcp:5432"], repair=True)
    lab.nft("delete", "element", "inet", "wiregate", "port4", "{ 100.64.0.2 . tcp . 5432 }")
    lab.nft("add", "element", "inet", "wiregate", "open4", "{ 100.64.0.2 }")
    assert lab.connect("100.64.0.2", 22) == "open"  # the drift lets everything in
    repaired = lab.apply(["tcp:5432"], repair=True)
    assert repaired["scripts"] == [
        "delete element inet wiregate open4 { 100.64.0.2 }\n"
        "add element inet wiregate port4 { 100.64.0.2 . 6 . 5432 }\n"
    ]
    assert lab.connect("100.64.0.2", 22) == "timeout"
    assert lab.connect("100.64.0.2", 5432) == "open"

    handles = json.loads(lab.nft("-a", "-j", "list", "chain", "inet", "wiregate", "from_tunnel"))
    last = [i["rule"]["handle"] for i in handles["nftables"] if "rule" in i][-1]
    lab.nft("delete", "rule", "inet", "wiregate", "from_tunnel", "handle", str(last))
    assert lab.connect("100.64.0.2", 22) == "open"  # the drop rule is gone
    rebuilt = lab.apply(["tcp:5432"], repair=True)
    assert "table inet wiregate {" in rebuilt["scripts"][0]
    assert lab.connect("100.64.0.2", 22) == "timeout"

    lab.call({"op": "teardown"})
    assert "wiregate" not in lab.nft("list", "tables")


def test_the_clamp_lowers_to_the_probed_path_mtu_and_never_raises(lab: Lab) -> None:
    lab.apply(None, repair=True)
    options = 1460 - lab.mss_seen(0)  # not probed: the route MTU (1500) allows 1460
    assert options in (0, 12)  # TCP_MAXSEG leaves out the timestamp option
    assert lab.apply(None, version=2, path_mtu=1240)["scripts"] == [
        "add element inet wiregate mss4 { 100.64.0.2 : 1200 }\n"
        "add element inet wiregate mss4_ranges { 10.77.0.0/16 . 6 : 1200 }\n"
        "add element inet wiregate mss6 { fd7a::2 : 1180 }\n"
    ]
    assert lab.mss_seen(0) == 1200 - options  # lowered to the path MTU's
    assert lab.mss_seen(800) == 800 - options  # a lower MSS is never raised

"""Pod identity enforced at a VM in the real kernel: one pod of a node may open the VM's port,
another is dropped and counted; the rule moving is enforced within 1 s; a churn of 200 pods
writes that node's elements only.

Namespaces: ``v`` (the VM) —veth— ``n`` (the node, forwarding) —veth— ``pa`` and ``pb``
(two pods, 10.244.1.5 and 10.244.1.6, in the node's pod CIDR 10.244.1.0/24). The VM's
receiver (:mod:`lab.pod_receiver`: map messages through the agent's MapSession into its
Firewall on the veth facing the node) is sent a full map, then deltas, as the gateway
would send them. The node peer's own ``filter`` is ``[]`` (nothing but replies): only its
``pods_from`` opens anything. Another node (10.244.2.0/24, with pods of its own) is in the
map, so that the churn can show it is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.pod_receiver import node_peer, written
from lab.tcp_listener import CLIENT, LISTENER

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
POD_A, POD_B = "10.244.1.5", "10.244.1.6"
OWN_POD = "10.244.9.9"  # a pod of the VM's namespace standing as a node's own
VM = "100.64.0.1"

if os.geteuid() != 0:
    pytest.skip("the pod filter lab needs root (network namespaces)", allow_module_level=True)
if shutil.which("nft") is None:
    pytest.skip("nftables is not installed", allow_module_level=True)


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def peer(n: int, pods_from: dict[str, list[str]]) -> dict[str, Any]:
    return node_peer(n, f"100.64.0.{n}", f"10.244.{n - 6}.0/24", pods_from)


OTHER = peer(8, {f"10.244.2.{i}": ["tcp:5432"] for i in range(2, 52)})


class Lab:
    def __init__(self, tag: str) -> None:
        self.v, self.n, self.pa, self.pb = (f"pf{x}{tag}" for x in "vnab")
        self.vv = f"pv{tag}"
        self.version = 0
        self.procs: list[subprocess.Popen[str]] = []

    def build(self) -> None:
        for ns in (self.v, self.n, self.pa, self.pb):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self._link(self.v, self.vv, self.n, "tov", "100.64.0.1/16", "100.64.0.7/16")
        sh("ip", "-n", self.v, "route", "add", "10.244.0.0/16", "via", "100.64.0.7")
        sh("ip", "-n", self.v, "addr", "add", f"{OWN_POD}/32", "dev", "lo")
        sh("ip", "-n", self.n, "route", "add", f"{OWN_POD}/32", "via", "100.64.0.1")
        sh("ip", "netns", "exec", self.n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, address, dev in ((self.pa, POD_A, "toa"), (self.pb, POD_B, "tob")):
            self._link(ns, "eth0", self.n, dev, f"{address}/32", None)
            sh("ip", "-n", ns, "route", "add", "default", "dev", "eth0")
            sh("ip", "-n", self.n, "route", "add", f"{address}/32", "dev", dev)
            sh("ip", "netns", "exec", self.n, "sysctl", "-qw", f"net.ipv4.conf.{dev}.proxy_arp=1")
        receiver = ["ip", "netns", "exec", self.v, sys.executable, "-m", "lab.pod_receiver"]
        self.receiver = self._start([*receiver, self.vv], stdin=subprocess.PIPE, cwd=ROOT)
        listener = ["ip", "netns", "exec", self.v, sys.executable, "-c", LISTENER, "5432"]
        started = self._start(listener)
        assert started.stdout is not None and started.stdout.readline().strip() == "listening"

    def _link(
        self, a: str, dev_a: str, b: str, dev_b: str, addr_a: str, addr_b: str | None
    ) -> None:
        sh("ip", "link", "add", dev_a, "netns", a, "type", "veth", "peer", dev_b, "netns", b)
        sh("ip", "-n", a, "addr", "add", addr_a, "dev", dev_a)
        if addr_b is not None:
            sh("ip", "-n", b, "addr", "add", addr_b, "dev", dev_b)
        sh("ip", "-n", a, "link", "set", dev_a, "up")
        sh("ip", "-n", b, "link", "set", dev_b, "up")

    def _start(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def send(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self.receiver
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        while not (line := proc.stdout.readline()).startswith("{"):  # log lines
            assert line, "the receiver ended"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def full(self, *peers: dict[str, Any]) -> dict[str, Any]:
        self.version = 1
        me = {"id": "vm", "name": "vm", "public_key": "V" * 43 + "=", "addresses": [f"{VM}/32"]}
        return self.send({"type": "full", "version": 1, "self": me, "peers": list(peers)})

    def delta(self, *peers: dict[str, Any]) -> dict[str, Any]:
        base, self.version = self.version, self.version + 1
        message = {"type": "delta", "base": base, "version": self.version, "self": None,
                   "upsert": list(peers), "remove": []}  # fmt: skip
        return self.send(message)

    def connect(self, pod: str, target: str = VM) -> str:
        ns = self.pa if pod == POD_A else self.pb
        client = [sys.executable, "-c", CLIENT, pod, target, "5432"]
        return sh("ip", "netns", "exec", ns, *client).strip()

    def dropped(self) -> int:
        return int(self.send({"op": "dropped"})["dropped"])

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in (self.v, self.n, self.pa, self.pb):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(secrets.token_hex(3)) as built:
        yield built


def elements(scripts: list[str]) -> list[str]:
    """Each element a script adds or deletes, ``verb set element``."""
    return [" ".join(item) for item in written(scripts)]


def test_only_the_allowed_pod_reaches_the_vm_and_a_move_is_enforced_within_1s(lab: Lab) -> None:
    first = lab.full(peer(7, {POD_A: ["tcp:5432"]}), OTHER)
    assert first["problems"] == [] and "table inet wiregate {" in first["scripts"][0]
    assert lab.connect(POD_A) == "open"
    before = lab.dropped()
    assert lab.connect(POD_B) == "timeout"  # dropped at the VM, not refused
    assert lab.dropped() > before

    sent = time.monotonic()
    moved = lab.delta(peer(7, {POD_B: ["tcp:5432"]}))
    took = time.monotonic() - sent
    assert moved["problems"] == [] and took < 1.0 and moved["seconds"] < 1.0
    assert all(line.startswith(("add element", "delete element"))
               for script in moved["scripts"] for line in script.splitlines())  # fmt: skip
    assert elements(moved["scripts"]) == [
        f"delete port4 {POD_A} . 6 . 5432",
        f"add port4 {POD_B} . 6 . 5432",
    ]
    assert lab.connect(POD_B) == "open"
    before = lab.dropped()
    assert lab.connect(POD_A) == "timeout"
    assert lab.dropped() > before


def test_a_churn_of_200_pods_writes_only_that_nodes_elements(lab: Lab) -> None:
    lab.full(peer(7, {POD_A: ["tcp:5432"]}), OTHER)
    churn = {f"10.244.1.{i}": ["tcp:5432"] for i in range(10, 210)}
    grown = lab.delta(peer(7, {POD_A: ["tcp:5432"], **churn}))
    added = elements(grown["scripts"])
    assert len(added) == 200 and all(e.startswith("add port4 10.244.1.") for e in added)
    assert grown["seconds"] < 1.0
    gone = lab.delta(peer(7, {POD_A: ["tcp:5432"]}))
    removed = elements(gone["scripts"])
    assert len(removed) == 200 and all(e.startswith("delete port4 10.244.1.") for e in removed)
    untouched = [e for e in added + removed if "10.244.2." in e or "100.64.0.8" in e]
    assert untouched == [] and all("table" not in s for s in grown["scripts"] + gone["scripts"])
    assert lab.connect(POD_A) == "open"  # the unchanged pod kept its element throughout


def test_pods_to_open_a_pod_of_this_node_and_every_pod_set_reads_back(lab: Lab) -> None:
    node = peer(7, {POD_A: ["tcp:8000-8099"], "10.244.1.7": ["udp:53", "icmp"]})
    node["pods_to"] = {OWN_POD: ["tcp:5432"], "fd00:10:244:9::9": ["tcp:22-23"]}
    node["allowed_ips"] += ["fd7a::7/128", "fd00:10:244:1::/64"]
    first = lab.full(node, OTHER)
    assert first["problems"] == []
    written_sets = {name for _, name, _ in written(first["scripts"])}
    assert {"pod_port4_ranges", "proto4", "to_port4", "to_port4_ranges", "to_port6_ranges"} <= (
        written_sets
    )
    assert lab.send({"op": "repair"})["scripts"] == []  # the kernel's listing reads back
    assert lab.connect(POD_A, OWN_POD) == "open"  # pods_to: the node's pod, from a pod of N
    assert lab.connect(POD_B, OWN_POD) == "open"  # (any source of N: its prefix)
    assert lab.connect(POD_A) == "timeout"  # but not the VM's own address on that port

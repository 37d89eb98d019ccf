"""End to end: a pod-identity rule, from the Kubernetes API to the VM's packet filter.

A node agent watches its pods at the API stand-in (the real ``kubernetes`` client),
reports them on its map stream; the gateway matches them against the policy's pod
selector and sends the VM the node's ``pods_from``; the VM's agent writes them as
elements of its filter's sets. Two pods of one node: only the one the selector picks
reaches the VM's port, the other is dropped at the VM and counted. A relabel at the
API moves the rule, enforced at the VM within 1 s each way; a pod the node claims
outside its own pod CIDR is refused by the gateway.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from lab.cluster import Cluster, tcp_exchange
from lab.harness import (
    INTERNET_GATEWAY,
    METRICS_PORT,
    Host,
    Lab,
    Namespace,
    Process,
    Wiregate,
    poll,
)
from lab.podapi import pod_document
from lab.tcp_listener import LISTENER

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

POLICY = """\
acls:
  - {src: ["tag:vm"], dst: ["tag:node"]}
  - src: [{pods: {namespace: payments, labels: {app: ledger}}}]
    dst: ["tag:vm"]
    ports: ["tcp:5432"]
routes:
  - {tags: ["tag:node"], allow: ["10.244.0.0/16"]}
"""
PORT = 5432
ENFORCED_WITHIN = 1.0  # s from the relabel at the API to the VM's filter acting on it
# connects to ADDR:PORT every 50 ms, printing "ok T" or "no T" (T: monotonic start)
PROBER = """\
import socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
while True:
    t = time.monotonic()
    try:
        with socket.create_connection((addr, port), timeout=0.2) as s:
            print(("ok " if s.recv(16) else "no ") + f"{t:.3f}", flush=True)
    except OSError:
        print(f"no {t:.3f}", flush=True)
    time.sleep(0.05)
"""


def attempts(prober: Process, since: float) -> list[tuple[str, float]]:
    """The prober's (verdict, start time) of attempts started at or after ``since``."""
    out = []
    for line in prober.output().splitlines():
        verdict, _, at = line.partition(" ")
        if verdict in ("ok", "no") and float(at) >= since:
            out.append((verdict, float(at)))
    return out


def first(prober: Process, verdict: str, since: float, timeout: float = 10.0) -> float:
    """Seconds from ``since`` to the start of the first attempt with ``verdict`` after
    which every later attempt has it too."""

    def settled() -> float | None:
        seen = attempts(prober, since)
        if not seen or seen[-1][0] != verdict:
            return None
        start = seen[-1][1]
        for kind, at in reversed(seen):
            if kind != verdict:
                break
            start = at
        return start - since if len(seen) > 3 and seen[-3][0] == verdict else None

    return float(poll(settled, timeout=timeout, interval=0.1, what=f"{verdict} from the prober"))


def dropped(vm: Host) -> int:
    doc = json.loads(vm.run(["nft", "-j", "list", "counter", "inet", "wiregate", "dropped"]).stdout)
    (counter,) = [item["counter"] for item in doc["nftables"] if "counter" in item]
    return int(counter["packets"])


def refused(lab: Lab) -> float:
    text = lab.internet.run(
        ["curl", "-sf", "-m", "5", f"http://{INTERNET_GATEWAY}:{METRICS_PORT}/metrics"]
    ).stdout
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("wiregate_pods_refused_total{")
    )


def start_prober(pod: Namespace, addr: str) -> Process:
    proc = pod.spawn([sys.executable, "-c", PROBER, addr, str(PORT)], name=f"{pod.name}-prober")
    poll(lambda: "ready" in proc.output(), timeout=20, what=f"{pod.name}'s prober")
    return proc


def test_a_pod_selector_lets_one_pod_reach_the_vm_and_follows_a_relabel(lab: Lab) -> None:
    policy = lab.workdir / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Wiregate(lab)
    gateway.gateway_env["WIREGATE_POLICY_FILE"] = str(policy)
    gateway.start_gateway()
    cluster = Cluster(lab)
    node = cluster.add_node("n1")
    ledger, ledger_ip = cluster.add_pod(node, "ledger", 20, namespace="payments",
                                        account="billing", labels={"app": "ledger"})  # fmt: skip
    web, web_ip = cluster.add_pod(node, "web", 21, namespace="payments", account="web",
                                  labels={"app": "web"})  # fmt: skip
    cluster.start()
    vm_host = lab.add_host("vm")
    vm_host.spawn([sys.executable, "-c", LISTENER, str(PORT)], name="vm-db")
    n1 = cluster.start_agent(gateway, node, gateway.create_key(tags="tag:node"))
    vm = gateway.start_agent(vm_host, gateway.create_key(tags="tag:vm"))
    statuses = gateway.wait_mesh([n1, vm], timeout=60)
    vm_addr = statuses["vm"]["device"]["addresses"][0].split("/")[0]

    # only the pod the selector picks reaches the VM's port; the other is dropped there
    said = poll(lambda: tcp_exchange(ledger, vm_addr, PORT) == "hello" or None, timeout=30,
                what="the ledger pod -> the VM's port")  # fmt: skip
    assert said
    before = dropped(vm_host)
    assert tcp_exchange(web, vm_addr, PORT) == "TimeoutError"  # dropped, not refused
    assert dropped(vm_host) > before
    # the node itself (its own address, not a pod's) may not open the port either
    assert tcp_exchange(node.host, vm_addr, PORT) == "TimeoutError"

    # a relabel at the API moves the rule: the web pod in, then the ledger pod out
    web_probe, ledger_probe = start_prober(web, vm_addr), start_prober(ledger, vm_addr)
    changed = time.monotonic()
    cluster.put_pod(node, "web", labels={"app": "ledger"})
    took_in = first(web_probe, "ok", changed)
    assert took_in < ENFORCED_WITHIN, f"the web pod was let in {took_in:.2f} s after its relabel"
    assert all(v == "ok" for v, _ in attempts(ledger_probe, changed))  # unrelated: untouched
    changed = time.monotonic()
    cluster.put_pod(node, "ledger", labels={"app": "archive"})
    took_out = first(ledger_probe, "no", changed)
    assert took_out < ENFORCED_WITHIN, f"the ledger pod kept access {took_out:.2f} s"
    assert all(v == "ok" for v, _ in attempts(web_probe, changed + 0.5))
    print(f"relabel enforced at the VM: in {took_in:.2f} s, out {took_out:.2f} s")

    # a pod the node claims outside its own pod CIDR (10.244.1.0/24) is refused
    outside = pod_document("payments", "stray", "10.244.2.50", "billing", node=node.host.name,
                           labels={"app": "ledger"})  # fmt: skip
    before_refused = refused(lab)
    cluster.put_document(outside)
    poll(lambda: refused(lab) > before_refused or None, timeout=10, what="the refusal counted")
    table = vm_host.run(["nft", "list", "table", "inet", "wiregate"]).stdout
    assert f"{web_ip} . tcp . {PORT}" in table, table
    assert "10.244.2.50" not in table and ledger_ip not in table, table

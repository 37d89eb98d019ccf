"""Pod identity in the lab: a node with two pods, a VM, a policy with a pod selector.

:func:`build` starts a gateway whose policy lets only pods of namespace ``payments``
labelled ``app: ledger`` open the VM's port 5432, a cluster node (lab/cluster.py:
the API stand-in serves its pods to the node agent's watch) with two such pods,
``ledger`` (app: ledger) and ``web`` (app: web), and a VM listening on the port.
:func:`relabel` changes a pod's labels at the API and measures, with a prober in
each pod connecting every 50 ms, how long the VM's packet filter took to act on it.
Used by ``tests/e2e/test_pod_identity.py`` and ``scripts/demo.py``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from functools import partial

from lab.cluster import Cluster, Node
from lab.harness import Agent, Host, Lab, Namespace, Process, Wiregate, poll
from lab.tcp_listener import LISTENER

__all__ = [
    "POLICY",
    "PORT",
    "PodLab",
    "attempts",
    "build",
    "dropped",
    "relabel",
    "settled",
    "start_probers",
]

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


@dataclass
class PodLab:
    """The scenario's parts, once every agent holds the map."""

    gateway: Wiregate
    cluster: Cluster
    node: Node
    node_agent: Agent
    vm_host: Host
    vm: Agent
    vm_addr: str  # the VM's tunnel address
    pods: dict[str, tuple[Namespace, str]]  # name -> (namespace, pod IP)
    probers: dict[str, Process] = field(default_factory=dict)


def build(lab: Lab) -> PodLab:
    policy = lab.workdir / "pod-policy.yaml"
    policy.write_text(POLICY)
    gateway = Wiregate(lab)
    gateway.gateway_env["WIREGATE_POLICY_FILE"] = str(policy)
    gateway.start_gateway()
    cluster = Cluster(lab)
    node = cluster.add_node("n1")
    pods = {
        "ledger": cluster.add_pod(node, "ledger", 20, namespace="payments", account="billing",
                                  labels={"app": "ledger"}),
        "web": cluster.add_pod(node, "web", 21, namespace="payments", account="web",
                               labels={"app": "web"}),
    }  # fmt: skip
    cluster.start()
    vm_host = lab.add_host("vm")
    vm_host.spawn([sys.executable, "-c", LISTENER, str(PORT)], name="vm-db")
    node_agent = cluster.start_agent(gateway, node, gateway.create_key(tags="tag:node"))
    vm = gateway.start_agent(vm_host, gateway.create_key(tags="tag:vm"))
    statuses = gateway.wait_mesh([node_agent, vm], timeout=60)
    vm_addr = statuses["vm"]["device"]["addresses"][0].split("/")[0]
    return PodLab(gateway, cluster, node, node_agent, vm_host, vm, vm_addr, pods)


def start_probers(pl: PodLab) -> None:
    """A prober in each pod toward the VM's port."""
    for name, (pod, _) in pl.pods.items():
        proc = pod.spawn([sys.executable, "-c", PROBER, pl.vm_addr, str(PORT)],
                         name=f"{name}-prober")  # fmt: skip
        pl.probers[name] = proc
        poll(partial(_ready, proc), timeout=20, what=f"{name}'s prober")


def _ready(proc: Process) -> bool:
    return "ready" in proc.output()


def attempts(prober: Process, since: float) -> list[tuple[str, float]]:
    """The prober's (verdict, start time) of attempts started at or after ``since``."""
    out = []
    for line in prober.output().splitlines():
        verdict, _, at = line.partition(" ")
        if verdict in ("ok", "no") and float(at) >= since:
            out.append((verdict, float(at)))
    return out


def settled(prober: Process, verdict: str, since: float, timeout: float = 10.0) -> float:
    """Seconds from ``since`` to the first attempt of the run of ``verdict`` the prober
    has been in since (at least three attempts long)."""

    def probe() -> float | None:
        seen = attempts(prober, since)
        if len(seen) < 3 or any(kind != verdict for kind, _ in seen[-3:]):
            return None
        start = seen[-1][1]
        for kind, at in reversed(seen):
            if kind != verdict:
                break
            start = at
        return start - since

    return float(poll(probe, timeout=timeout, interval=0.1, what=f"{verdict} from the prober"))


def relabel(pl: PodLab, name: str, labels: dict[str, str], expect: str) -> float:
    """Relabel pod ``name`` at the API; seconds until its prober settled on ``expect``
    (``ok``: the VM lets it in, ``no``: it is dropped)."""
    if name not in pl.probers:
        start_probers(pl)
    changed = time.monotonic()
    pl.cluster.put_pod(pl.node, name, labels=labels)
    return settled(pl.probers[name], expect, changed)


def dropped(vm: Host) -> int:
    """Packets the VM's filter dropped (its ``dropped`` counter)."""
    doc = json.loads(vm.run(["nft", "-j", "list", "counter", "inet", "wiregate", "dropped"]).stdout)
    (counter,) = [item["counter"] for item in doc["nftables"] if "counter" in item]
    return int(counter["packets"])

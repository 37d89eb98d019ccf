"""Pod identity: the gateway's cost of one pod change, in process.

``python -m benchmarks.pod_policy`` builds a broker holding 100 nodes (``tag:node``,
a /24 pod CIDR each) with 100 pods each (10 000 pods: 10 namespaces, 20 ``app``
labels, a ``metrics`` label on a tenth), 300 VMs (``tag:db``, ``tag:web``,
``tag:monitor``) and a policy of pod rules both ways; every device's agent holds
its map. It then applies pod changes one at a time, as a node's ``pods`` message
does (relabel, add, delete, in turn), and prints:

* ``pod_change_ms`` (the p99, the figure held to the target, < 5 ms),
  ``pod_change_ms_p50`` / ``pod_change_ms_p99``: wall time of one change, from the
  report to every affected agent's delta encoded (the pod table, the compiled rules,
  the fan-out and the delta texts; no store write, no sockets); what the broker holds
  after loading is frozen out of the garbage collector, as the gateway does;
* ``pod_change_bytes``: median bytes of the deltas one change sends, summed over the
  agents that receive one, and ``pod_change_bytes_max``;
* ``pod_change_agents``: median number of agents told per change;
* ``pod_relabel_ms_p50``, ``pod_add_ms_p50``, ``pod_delete_ms_p50``: per kind.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import replace

from benchmarks.common import emit, make_device
from gateway.mapping.broker import Broker
from identity.policy import Policy
from identity.policy_file import parse_policy
from wiregate.model import Device
from wiregate.podwire import Pod, PodReport

NODES, PODS_PER_NODE, VMS = 100, 100, 300
NAMESPACES = [f"team-{i}" for i in range(9)] + ["payments"]
APPS = [f"app-{i}" for i in range(19)] + ["ledger"]
CHANGES = 300  # 100 of each kind

POLICY = {
    "acls": [
        {"src": ["tag:node"], "dst": ["tag:node"]},
        {"src": ["tag:monitor"], "dst": ["tag:node"], "ports": ["tcp:9100"]},
        {"src": [{"pods": {"namespace": "payments", "labels": {"app": "ledger"}},
                  "nodes": ["tag:node"]}], "dst": ["tag:db"], "ports": ["tcp:5432"]},
        {"src": [{"pods": {"namespace": "team-3"}, "nodes": ["tag:node"]}],
         "dst": ["tag:db"], "ports": ["tcp:5432", "tcp:6379"]},
        {"src": ["tag:web"], "dst": [{"pods": {"labels": {"app": "app-7"}},
                                      "nodes": ["tag:node"]}], "ports": ["tcp:8080"]},
        {"src": ["tag:monitor"], "dst": [{"pods": {"labels": {"metrics": "true"}},
                                          "nodes": ["tag:node"]}], "ports": ["tcp:9090"]},
    ],
    "routes": [{"tags": ["tag:node"], "allow": ["10.244.0.0/16"]}],
}  # fmt: skip


def devices() -> list[Device]:
    """The nodes (d0..d99) and the VMs: mostly databases and web servers, a few monitors."""
    nodes = [
        replace(make_device(i, ("tag:node",)), routes=(f"10.244.{i}.0/24",)) for i in range(NODES)
    ]
    kinds = ["tag:db"] * 140 + ["tag:web"] * 150 + ["tag:monitor"] * 10
    vms = [make_device(NODES + i, (kind,)) for i, kind in enumerate(kinds[:VMS])]
    return nodes + vms


def pod(node: int, index: int, app: str | None = None) -> Pod:
    """Pod ``index`` of a node, spread over the namespaces and apps."""
    labels = {"app": app or APPS[(node + index) % len(APPS)]}
    if index % 10 == 0:
        labels["metrics"] = "true"
    return Pod(
        namespace=NAMESPACES[index % len(NAMESPACES)],
        name=f"pod-{node}-{index}",
        ips=(f"10.244.{node}.{index + 2}",),
        service_account="default",
        labels=tuple(sorted(labels.items())),
    )


def loaded(policy: Policy) -> Broker:
    """A broker holding the fleet and every node's pods, each agent at the head version."""
    broker = Broker(policy, history=8, queue_size=16)
    fleet = devices()
    broker.load(fleet, 1)
    for node in range(NODES):
        report = PodReport(True, tuple(pod(node, i) for i in range(PODS_PER_NODE)))
        broker.pods(f"d{node}", report, broker.version + 1)
    for device in fleet:
        broker._full(device.id)  # the agent connected: its log is kept from now on
    return broker


def change(broker: Broker, step: int) -> tuple[str, PodReport, str]:
    """The ``step``-th change, each one that some rule selects, on a node chosen in turn:
    a pod relabelled into or out of the ledger rule (the databases see it), a pod added
    in ``team-3`` (the databases), a pod with ``metrics`` deleted (the node's monitors)."""
    node = step * 37 % NODES
    kind = ("relabel", "add", "delete")[step % 3]
    index = step // 3 % (PODS_PER_NODE // 10) * 10  # a pod with the metrics label
    if kind == "relabel":  # the same pod into the rule, then out of it
        node, index = step // 6 * 37 % NODES, step // 6 % 10 * 10
        app = "ledger" if step // 3 % 2 == 0 else "app-1"
        report = PodReport(False, (replace(pod(node, index + 9, app), namespace="payments"),))
    elif kind == "add":
        new = replace(pod(node, index + 3), name=f"new-{node}-{index}",
                      ips=(f"10.244.{node}.{200 + index // 10}",))  # fmt: skip
        report = PodReport(False, (new,))
    else:
        report = PodReport(False, remove=(pod(node, index).key,))
    return f"d{node}", report, kind


def sent(broker: Broker, version: int) -> tuple[int, int]:
    """(agents told, bytes) of the deltas at ``version``."""
    agents = size = 0
    for agent_log in broker._logs.values():
        if agent_log.entries and agent_log.entries[-1].version == version:
            agents += 1
            size += len(agent_log.entries[-1].render())
    return agents, size


def run() -> dict[str, float]:
    """Measure every figure; see the module docstring."""
    broker = loaded(parse_policy(POLICY).policy)
    gc.collect()
    gc.freeze()  # as the gateway does with what it holds when it starts (gateway/memory.py)
    took: dict[str, list[float]] = {"relabel": [], "add": [], "delete": []}
    sizes, told = [], []
    for step in range(CHANGES):
        node, report, kind = change(broker, step)
        version = broker.version + 1
        started = time.perf_counter()
        broker.pods(node, report, version)
        took[kind].append(time.perf_counter() - started)
        agents, size = sent(broker, version)
        told.append(agents)
        sizes.append(size)
    every = sorted(t for times in took.values() for t in times)
    p99 = 1e3 * every[int(0.99 * (len(every) - 1))]
    results = {
        "pod_change_ms": p99,
        "pod_change_ms_p50": 1e3 * statistics.median(every),
        "pod_change_ms_p99": p99,
        "pod_change_bytes": statistics.median(sizes),
        "pod_change_bytes_max": max(sizes),
        "pod_change_agents": statistics.median(told),
    }
    for kind, times in took.items():
        results[f"pod_{kind}_ms_p50"] = 1e3 * statistics.median(times)
    return results


if __name__ == "__main__":
    emit(run())

"""End to end: a pod-identity rule, from the Kubernetes API to the VM's packet filter.

A node agent watches its pods at the API stand-in (the real ``kubernetes`` client),
reports them on its map stream; the gateway matches them against the policy's pod
selector and sends the VM the node's ``pods_from``; the VM's agent writes them as
elements of its filter's sets (lab/poddemo.py builds the scenario). Two pods of one
node: only the one the selector picks reaches the VM's port, the other is dropped at
the VM and counted. A relabel at the API moves the rule, enforced at the VM within
1 s each way; a pod the node claims outside its own pod CIDR is refused by the gateway.
"""

from __future__ import annotations

import time

import pytest

from lab.cluster import tcp_exchange
from lab.harness import INTERNET_GATEWAY, METRICS_PORT, Lab, poll
from lab.podapi import pod_document
from lab.poddemo import PORT, attempts, build, dropped, relabel

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

ENFORCED_WITHIN = 1.0  # s from the relabel at the API to the VM's filter acting on it


def refused(lab: Lab) -> float:
    text = lab.internet.run(
        ["curl", "-sf", "-m", "5", f"http://{INTERNET_GATEWAY}:{METRICS_PORT}/metrics"]
    ).stdout
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("wiregate_pods_refused_total{")
    )


def test_a_pod_selector_lets_one_pod_reach_the_vm_and_follows_a_relabel(lab: Lab) -> None:
    pl = build(lab)
    (ledger, ledger_ip), (web, web_ip) = pl.pods["ledger"], pl.pods["web"]

    # only the pod the selector picks reaches the VM's port; the other is dropped there
    said = poll(lambda: tcp_exchange(ledger, pl.vm_addr, PORT) == "hello" or None, timeout=30,
                what="the ledger pod -> the VM's port")  # fmt: skip
    assert said
    before = dropped(pl.vm_host)
    assert tcp_exchange(web, pl.vm_addr, PORT) == "TimeoutError"  # dropped, not refused
    assert dropped(pl.vm_host) > before
    # the node itself (its own address, not a pod's) may not open the port either
    assert tcp_exchange(pl.node.host, pl.vm_addr, PORT) == "TimeoutError"

    # a relabel at the API moves the rule: the web pod in, then the ledger pod out
    changed = time.monotonic()
    took_in = relabel(pl, "web", {"app": "ledger"}, "ok")
    assert took_in < ENFORCED_WITHIN, f"the web pod was let in {took_in:.2f} s after its relabel"
    assert all(v == "ok" for v, _ in attempts(pl.probers["ledger"], changed))  # untouched
    changed = time.monotonic()
    took_out = relabel(pl, "ledger", {"app": "archive"}, "no")
    assert took_out < ENFORCED_WITHIN, f"the ledger pod kept access {took_out:.2f} s"
    assert all(v == "ok" for v, _ in attempts(pl.probers["web"], changed + 0.5))
    print(f"relabel enforced at the VM: in {took_in:.2f} s, out {took_out:.2f} s")

    # a pod the node claims outside its own pod CIDR (10.244.1.0/24) is refused
    outside = pod_document("payments", "stray", "10.244.2.50", "billing",
                           node=pl.node.host.name, labels={"app": "ledger"})  # fmt: skip
    before_refused = refused(lab)
    pl.cluster.put_document(outside)
    poll(lambda: refused(lab) > before_refused or None, timeout=10, what="the refusal counted")
    table = pl.vm_host.run(["nft", "list", "table", "inet", "wiregate"]).stdout
    assert f"{web_ip} . tcp . {PORT}" in table, table
    assert "10.244.2.50" not in table and ledger_ip not in table, table

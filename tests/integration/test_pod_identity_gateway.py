"""Pod identity through a real ``wiregate gateway`` process: a node with an approved pod
CIDR reports its pods on its map stream, a VM's stream receives a delta whose entry
for the node lists the pod the policy lets in (``pods_from``); a pod outside the node's
CIDR is refused and counted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lab.fakes import new_key
from lab.gateway_process import Gateway, stop, wait_live, write_config
from lab.idp import free_port
from wiregate.podwire import Pod, build_pods

ROOT = Path(__file__).resolve().parents[2]
POLICY = """
acls:
  - {src: [tag:node], dst: [tag:node]}
  - src: [{pods: {namespace: payments, labels: {app: ledger}}, nodes: [tag:node]}]
    dst: [tag:db]
    ports: ["tcp:5432"]
routes:
  - {tags: [tag:node], allow: ["10.244.0.0/16"]}
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    """A gateway process (this checkout's code) with the policy above; and its metrics URL."""
    port, metrics = free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    config = write_config(tmp_path, port, metrics, f'policy_file = "{policy}"\n')
    log = tmp_path / "gateway.log"
    main = "from wiregate.cli.main import main; main()"  # cwd first: this checkout's packages
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", main, "gateway", "--config", str(config)],
            stdout=out, stderr=out, cwd=ROOT, env={**os.environ, "WIREGATE_LOG_FORMAT": "json"},
        )  # fmt: skip
    gw = Gateway(f"http://127.0.0.1:{port}", tmp_path / "state", process, log)
    try:
        wait_live(gw, timeout=30)
        yield gw, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        stop(process)


def enroll(gw: Gateway, tag: str, name: str, routes: list[str]) -> dict[str, Any]:
    status, key = gw.admin("POST", "/api/v1/keys", {"tags": [tag], "reusable": False})
    assert status == 201, key
    body = {"auth_key": key["secret"], "public_key": new_key(), "name": name, "routes": routes}
    status, enrolled = gw.api("POST", "/api/v1/enroll", body)
    assert status == 201, enrolled
    return dict(enrolled)


async def next_delta(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = await ws.receive_json(timeout=10)
        if message["type"] == "delta":
            return message


def refused(metrics: str) -> float:
    with urllib.request.urlopen(metrics, timeout=10) as resp:
        text = resp.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("wiregate_pods_refused_total{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if 'reason="outside"' in ln)


async def test_a_nodes_pod_reaches_the_vm_it_may_open(gateway: tuple[Gateway, str]) -> None:
    gw, metrics = gateway
    node = enroll(gw, "tag:node", "node-1", ["10.244.1.0/24"])
    db = enroll(gw, "tag:db", "db-1", [])
    url = gw.url.replace("http://", "ws://") + "/api/v1/stream"
    ledger = Pod("payments", "ledger-1", ("10.244.1.5",), "ledger", (("app", "ledger"),))
    stray = Pod("payments", "ledger-2", ("10.244.7.5",), "ledger", (("app", "ledger"),))
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {db['token']}"}
        async with session.ws_connect(url, headers=auth) as vm_ws:
            full = await vm_ws.receive_json(timeout=10)
            assert full["type"] == "full"
            assert [p["id"] for p in full["peers"]] == [node["device"]["id"]]
            assert "pods_from" not in full["peers"][0]
            auth = {"Authorization": f"Bearer {node['token']}"}
            async with session.ws_connect(url, headers=auth) as node_ws:
                assert (await node_ws.receive_json(timeout=10))["type"] == "full"
                started = time.monotonic()
                await node_ws.send_json(build_pods(True, [ledger, stray]))
                delta = await next_delta(vm_ws)
                assert time.monotonic() - started < 1.0  # pod churn reaches peers within 1 s
                (peer,) = delta["upsert"]
                assert peer["id"] == node["device"]["id"]
                assert peer["pods_from"] == {"10.244.1.5": ["tcp:5432"]}
                assert peer["filter"] == []  # the node itself opens nothing on the VM
                for _ in range(100):
                    if refused(metrics) >= 1:
                        break
                    await asyncio.sleep(0.05)
                assert refused(metrics) == 1
                await node_ws.send_json(build_pods(False, remove=[ledger.key]))
                delta = await next_delta(vm_ws)
                assert "pods_from" not in delta["upsert"][0]
                assert not node_ws.closed  # a refused pod does not end the stream

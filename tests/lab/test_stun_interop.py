"""STUN interop: independent clients against the real ``wiregate relay`` process.

The relay serves STUN on a host on the lab's internet; the clients run on a host
behind an endpoint-independent NAT router, so the reflexive address they learn
is the router's WAN address, not anything they could know locally:

* coturn's ``turnutils_stunclient`` (Debian's ``coturn``): a plain RFC 5389
  Binding request;
* aioice (PyPI, the ICE agent of aiortc): its own STUN codec, transactions and
  retransmissions, gathering a server-reflexive candidate as a browser's ICE
  agent would.

The relay's metrics must show those answers as successes and nothing refused.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from lab.harness import Host, Lab, Process, poll, wiregate_command

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

if shutil.which("turnutils_stunclient") is None:
    pytest.skip("turnutils_stunclient (Debian's coturn) is not installed", allow_module_level=True)
pytest.importorskip("aioice", reason="aioice (a dev dependency) is not installed")

REFLEXIVE = re.compile(r"UDP reflexive addr: ([0-9.]+):(\d+)")
GATHER = """
import asyncio, json, sys
import aioice

async def main() -> None:
    conn = aioice.Connection(ice_controlling=True, stun_server=(sys.argv[1], int(sys.argv[2])),
                             use_ipv6=False)
    await conn.gather_candidates()
    print(json.dumps([
        {"type": c.type, "host": c.host, "port": c.port, "related": c.related_address}
        for c in conn.local_candidates
    ]))
    await conn.close()

asyncio.run(main())
"""


def start_relay(host: Host) -> Process:
    relay = host.spawn(
        [*wiregate_command(), "relay", "--stun-listen", "0.0.0.0:3478",
         "--metrics-listen", f"{host.addr}:9091"],
        name="relay",
    )  # fmt: skip
    poll(lambda: "relay listening" in relay.output(), timeout=30, what="relay to listen")
    return relay


def outcomes(server: Host, client: Host) -> dict[str, float]:
    url = f"http://{server.addr}:9091/metrics"
    text = client.run([sys.executable, "-c", f"import urllib.request as u; "
                       f"print(u.urlopen({url!r}, timeout=5).read().decode())"]).stdout  # fmt: skip
    found = re.findall(r'wiregate_stun_datagrams_total\{outcome="(\w+)"\} ([0-9.e+]+)', text)
    return {name: float(value) for name, value in found}


@pytest.fixture
def topology(lab: Lab) -> tuple[Host, Host, str]:
    """(relay host, client host behind an EIM NAT, the router's WAN address)."""
    server = lab.add_host("relay")
    router = lab.add_router("nat", nat="eim")
    client = lab.add_host("client", behind=router)
    start_relay(server)
    return server, client, router.wan_addr


def test_turnutils_stunclient_learns_the_nat_mapping(topology: tuple[Host, Host, str]) -> None:
    server, client, wan = topology
    proc = client.run(["timeout", "10", "turnutils_stunclient", "-p", "3478", server.addr])
    found = REFLEXIVE.search(proc.stdout)
    assert found is not None, proc.stdout + proc.stderr
    assert found.group(1) == wan and found.group(1) != client.addr
    seen = outcomes(server, client)
    assert seen["success"] >= 1
    assert sum(v for k, v in seen.items() if k not in ("success",)) == 0, seen


def test_aioice_gathers_a_server_reflexive_candidate(topology: tuple[Host, Host, str]) -> None:
    server, client, wan = topology
    proc = client.run([sys.executable, "-c", GATHER, server.addr, "3478"], timeout=60)
    candidates = json.loads(proc.stdout.strip().splitlines()[-1])
    srflx = [c for c in candidates if c["type"] == "srflx"]
    assert srflx, candidates
    assert {c["host"] for c in srflx} == {wan}
    assert {c["related"] for c in srflx} == {client.addr}
    seen = outcomes(server, client)
    assert seen["success"] >= 1
    assert sum(v for k, v in seen.items() if k not in ("success",)) == 0, seen

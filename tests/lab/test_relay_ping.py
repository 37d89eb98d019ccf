"""Relay PING for real: ``wiregate relay`` in the lab's internet namespace, probed from
an open host (``wiregate netcheck --relay``), from behind a UDP-blocking router, and
from the relay's own namespace (a gateway on the relay's host: its PING comes from
the relay's own address and is answered only because that address is local).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest
from nacl.signing import SigningKey

from lab.harness import INTERNET_GATEWAY, Lab, Namespace, Process, poll, wiregate_command

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

CONTROL = f"{INTERNET_GATEWAY}:3480"
STUN = f"{INTERNET_GATEWAY}:3478"


def start_relay(lab: Lab) -> Process:
    keys = lab.workdir / "relay-signers.json"
    public = base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()
    keys.write_text(json.dumps({"signers": [{"public_key": public, "tenants": ["default"]}]}))
    relay = lab.internet.spawn(
        [*wiregate_command(), "relay", "--stun-listen", STUN, "--relay-id", "r1",
         "--relay-listen", CONTROL, "--relay-ports", "40000-40009",
         "--verify-keys-file", str(keys), "--metrics-listen", "127.0.0.1:9091"],
        name="relay",
    )  # fmt: skip
    poll(lambda: "relay forwarding" in relay.output(), timeout=20, what="relay forwarding")
    return relay


def ping(ns: Namespace, control: str, wait: float = 1.0) -> dict[str, Any]:
    """``ping_relay`` run inside ``ns``: the result, or the error's class name."""
    host, port = control.rsplit(":", 1)
    script = (
        "import asyncio, json, sys\n"
        "from relay.client.probe import ping_relay\n"
        "try:\n"
        f"    r = asyncio.run(ping_relay(({host!r}, {port}), {wait}))\n"
        "    print(json.dumps({'rtt': r.rtt, 'allocations': r.allocations, "
        "'capacity': r.capacity}))\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__}))\n"
    )
    return dict(json.loads(ns.run([sys.executable, "-c", script], timeout=30).stdout))


def test_relay_ping_from_everywhere(lab: Lab) -> None:
    relay = start_relay(lab)
    open_host = lab.add_host("o1")
    blocked = lab.add_host("b1", behind=lab.add_router("rb1", nat="eim", block_udp=True))

    answer = ping(open_host, CONTROL)
    assert answer.get("capacity") == 5 and answer.get("allocations") == 0, answer
    assert 0 < answer["rtt"] < 0.5

    assert ping(blocked, CONTROL) == {"error": "RelayTimeout"}

    # the relay's own namespace: the source is the relay's own (local) address
    local = ping(lab.internet, CONTROL)
    assert local.get("capacity") == 5, local

    cmd = [*wiregate_command(), "netcheck", "--stun", STUN, "--relay", f"r1={CONTROL}",
           "--relay", "gone=198.51.100.77:3480", "--json"]  # fmt: skip
    doc = json.loads(open_host.run(cmd, timeout=60).stdout)
    by_id = {r["id"]: r for r in doc["relays"]}
    assert by_id["r1"]["reachable"] is True and 0 < by_id["r1"]["rtt_ms"] < 500, doc
    assert by_id["r1"]["control"] == CONTROL and by_id["r1"]["error"] == ""
    assert by_id["gone"]["reachable"] is False and "no PONG" in by_id["gone"]["error"]
    assert doc["nat_type"] in ("open", "unknown"), doc  # one STUN server, not translated
    assert relay.alive()

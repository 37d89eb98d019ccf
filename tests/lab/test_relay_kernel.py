"""The relay's kernel fast path, for real: two wireguard-go peers behind NAT routers,
relayed by ``wiregate relay`` in the lab's internet namespace with tickets signed here.

* pings keep flowing with the relay process stopped (SIGSTOP): the kernel carries them;
* datagrams from an unbound source, and non-WireGuard datagrams from the bound source,
  are dropped in the kernel (its named counters rise) and never reach the peer;
* a handshake with a forged mac1 from the bound source reaches Python (untracked) and
  is refused there (``bad_mac1``); the kernel's counters appear in the metrics;
* a rebind from a new address (a changed NAT mapping) moves the rules at once: the
  old address is an unbound source from then on;
* a device over its byte quota is limited in the kernel (``over_bandwidth``);
* idle expiry removes the pair's rules (the tunnel stops);
* a relay killed with -9 leaves its table; restarted, it replaces it, the old pair
  no longer passes, and the agents' rebind brings it back through the kernel;
* a table deleted underneath is rebuilt; SIGTERM removes it;
* a device revoked at the gateway (the revocation document next to the signers,
  served here by a small aiohttp server) loses the pair's nftables elements and its
  tunnel within :data:`REVOCATION_BOUND` seconds, and its older tickets are refused.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
from nacl.signing import SigningKey

from lab.harness import INTERNET_GATEWAY, Host, Lab, Process, poll, wiregate_command
from relay.kernelpath import table_name
from relay.tickets import Node, issue_pair
from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

RELAY = INTERNET_GATEWAY
TABLE = table_name("r1")
CONTROL = 3480
WG_PORT = 51820
TENANT = "default"
TUNNEL = {"a": "10.77.0.1", "b": "10.77.0.2"}
GATEWAY = "127.0.0.1:8089"  # the documents' server, in the relay's namespace
#: Revocation at the gateway -> the pair's rules gone: one 1 s poll of the revocation
#: document, the fetch, and one nftables transaction with its conntrack flush
#: (docs/operations.md, "Revoking a device at the relays").
REVOCATION_BOUND = 2.5


@dataclass
class Peer:
    host: Host
    name: str
    private: bytes
    node: Node


def start_relay(lab: Lab, key: SigningKey, **settings: Any) -> Process:
    """``wiregate relay`` with ``forward_path = "kernel"`` and the given [relay] settings."""
    public = base64.b64encode(bytes(key.verify_key)).decode()
    keys = lab.workdir / "relay-signers.json"
    keys.write_text(json.dumps({"signers": [{"public_key": public, "tenants": [TENANT]}]}))
    doc: dict[str, Any] = {
        "relay_id": "r1",
        "relay_listen": f"{RELAY}:{CONTROL}",
        "relay_ports": "40000-40009",
        "stun_listen": [f"{RELAY}:3478"],
        "metrics_listen": "127.0.0.1:9091",
        "verify_keys_file": str(keys),
        "forward_path": "kernel",
        **settings,
    }
    if "signers_url" in settings:
        del doc["verify_keys_file"]
    config = lab.workdir / "relay.toml"
    config.write_text("[relay]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in doc.items()))
    cmd = [*wiregate_command(), "relay", "--config", str(config)]
    relay = lab.internet.spawn(cmd, name="relay")
    poll(lambda: "relay kernel path on" in relay.output(), timeout=20, what="relay kernel path")
    return relay


def make_peer(lab: Lab, name: str) -> Peer:
    host = lab.add_host(f"{name}1", behind=lab.add_router(f"r{name}", nat="eim"))
    private = generate_private_key()
    keyfile = lab.workdir / f"{name}.key"
    keyfile.write_text(encode_key(private) + "\n")
    keyfile.chmod(0o600)
    host.spawn(["wireguard-go", "-f", host.wg_ifname], name=f"wg-{name}")
    poll(
        lambda: host.run(["wg", "show", host.wg_ifname], check=False).returncode == 0,
        timeout=10,
        what="wireguard-go",
    )
    host.run(["wg", "set", host.wg_ifname, "private-key", str(keyfile),
              "listen-port", str(WG_PORT)])  # fmt: skip
    host.run(["ip", "addr", "add", f"{TUNNEL[name]}/24", "dev", host.wg_ifname])
    host.run(["ip", "link", "set", host.wg_ifname, "up", "mtu", "1380"])
    node = Node(f"dev-{name}", encode_key(public_from_private(private)))
    return Peer(host, name, private, node)


_BIND = """
import asyncio, sys
from agent.paths.relaylink import RelayGrant, bind_at_relay
ticket = bytes.fromhex(sys.stdin.read().strip())
binding = asyncio.run(bind_at_relay(RelayGrant("r1", (sys.argv[1], int(sys.argv[2])), ticket),
                                    int(sys.argv[3])))
print(binding.endpoint)
"""


def bind_pair(key: SigningKey, a: Peer, b: Peer, listen_port: int = WG_PORT) -> None:
    """Tickets for (a, b), each side bound from its WireGuard port; peers point at the relay.
    ``listen_port`` is a's (b's is :data:`WG_PORT`)."""
    tickets = issue_pair(
        key, relay_id="r1", tenant=TENANT, node_a=a.node, node_b=b.node, now=time.time()
    )
    endpoints = []
    for peer, ticket, wg_port in zip((a, b), tickets, (listen_port, WG_PORT), strict=True):
        out = peer.host.run(
            [sys.executable, "-c", _BIND, RELAY, str(CONTROL), str(wg_port)],
            input=ticket.hex(),
            timeout=30,
        )
        endpoints.append(out.stdout.strip().splitlines()[-1])
    for me, other, endpoint in ((a, b, endpoints[0]), (b, a, endpoints[1])):
        me.host.run(["wg", "set", me.host.wg_ifname, "peer", other.node.public_key,
                     "endpoint", endpoint, "allowed-ips", f"{TUNNEL[other.name]}/32"])  # fmt: skip


def table(lab: Lab) -> dict[str, Any]:
    out = lab.internet.run(["nft", "-j", "list", "table", "inet", TABLE], check=False)
    if out.returncode != 0:
        return {}
    return dict(json.loads(out.stdout))


def counters(lab: Lab) -> dict[str, int]:
    """Packets per named counter of the relay's table."""
    return {
        item["counter"]["name"]: item["counter"]["packets"]
        for item in table(lab).get("nftables", [])
        if "counter" in item
    }


def set_elements(lab: Lab, name: str) -> list[Any]:
    for item in table(lab).get("nftables", []):
        found = item.get("set") or item.get("map")
        if found and found["name"] == name:
            return list(found.get("elem", []))
    return []


def side_counters(lab: Lab) -> dict[str, int]:
    """Transport datagrams each bound side sent through the kernel (``forwarded4``)."""
    return {
        " ".join(map(str, e["elem"]["val"]["concat"])): e["elem"]["counter"]["packets"]
        for e in set_elements(lab, "forwarded4")
    }


def pings(peer: Peer, to: str, count: int = 5) -> bool:
    return peer.host.ping(TUNNEL[to], count=count, timeout=count * 0.2 + 3)


_RAW = """
import socket, struct, sys
dst, dport, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes.fromhex(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
for _ in range(int(sys.argv[5])):
    sock.sendto(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, (dst, 0))
"""


def send_raw(peer: Peer, port: int, sport: int, payload: bytes, count: int = 10) -> None:
    """``count`` datagrams from ``peer``'s host, source port ``sport``, to the relay's ``port``."""
    peer.host.run([sys.executable, "-c", _RAW, RELAY, str(port), str(sport), payload.hex(),
                   str(count)])  # fmt: skip


def watch_arrivals(peer: Peer) -> None:
    """Count, at ``peer``, UDP datagrams to its WireGuard port of the lengths the test sends."""
    peer.host.run(["nft", "add table inet watch; "
                   "add chain inet watch in { type filter hook input priority -400; }; "
                   f"add rule inet watch in udp dport {WG_PORT} udp length {{ 45, 57, 156 }} "
                   "counter"])  # fmt: skip


def arrivals(peer: Peer) -> int:
    doc = json.loads(peer.host.run(["nft", "-j", "list", "table", "inet", "watch"]).stdout)
    for item in doc["nftables"]:
        if "rule" in item:
            for expr in item["rule"]["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError("no counter in the watch table")


def relay_port_of(peer: Peer) -> int:
    """The relay port ``peer``'s WireGuard sends to (its peer's endpoint)."""
    out = peer.host.run(["wg", "show", peer.host.wg_ifname, "endpoints"]).stdout
    return int(out.split()[-1].rsplit(":", 1)[1])


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def test_kernel_carries_a_bound_pair_and_drops_the_rest(lab: Lab, key: SigningKey) -> None:
    relay = start_relay(lab, key)
    a, b = make_peer(lab, "a"), make_peer(lab, "b")
    bind_pair(key, a, b)
    assert pings(a, "b"), relay.output(tail=2000)
    poll(lambda: len(set_elements(lab, "kernel_ports")) == 2, timeout=10, what="pair installed")

    # the relay process stopped: the kernel alone carries the pair
    before = side_counters(lab)
    relay.signal(signal.SIGSTOP)
    try:
        assert pings(a, "b", count=10), "no ping through the kernel with the relay stopped"
        assert pings(b, "a", count=5)
        after = side_counters(lab)
    finally:
        relay.signal(signal.SIGCONT)
    assert len(before) == 2 and all(after[k] >= before[k] + 5 for k in before), (before, after)

    # an unbound source (another port of a's host) and non-WireGuard datagrams from the
    # bound source: dropped and counted in the kernel, never seen by b
    watch_arrivals(b)
    port = relay_port_of(a)
    drops = counters(lab)
    transport_shaped = b"\x04\x00\x00\x00" + bytes(12) + bytes(32)  # 48 bytes: udp length 56
    send_raw(a, port, 40999, transport_shaped, count=10)
    junk = b"\x04\x00\x00\x00" + bytes(33)  # 37 bytes: not 16 + 16n (udp length 45)
    send_raw(a, port, WG_PORT, junk, count=10)
    send_raw(a, port, WG_PORT, b"x" * 49, count=10)  # not WireGuard at all (udp length 57)
    # a handshake initiation whose mac1 is not keyed with b's key: the kernel hands it to
    # Python (untracked), which checks mac1 and drops it
    forged = b"\x01\x00\x00\x00" + bytes(144)  # 148 bytes: udp length 156
    send_raw(a, port, WG_PORT, forged, count=5)
    time.sleep(0.5)
    now = counters(lab)
    assert now["unbound_source"] >= drops["unbound_source"] + 10, (drops, now)
    assert now["not_wireguard"] >= drops["not_wireguard"] + 20, (drops, now)
    assert arrivals(b) == 0
    assert pings(a, "b")  # the pair is untouched
    # the housekeeping timer reads the counters back into the metrics
    poll(
        lambda: (
            metric(lab, 'wiregate_relay_kernel_datagrams_total{outcome="forwarded"}') >= 25
            and metric(lab, 'wiregate_relay_kernel_datagrams_total{outcome="unbound_source"}') >= 10
            and metric(lab, 'wiregate_relay_kernel_datagrams_total{outcome="not_wireguard"}') >= 20
        ),
        timeout=15,
        what="kernel counters in the metrics",
    )
    assert metric(lab, 'wiregate_relay_datagrams_total{outcome="bad_mac1"}') >= 5
    assert metric(lab, 'wiregate_relay_forward_path{path="kernel"}') == 1
    assert metric(lab, "wiregate_relay_kernel_pairs") == 1

    # a's mapping changes (new WireGuard port) and it rebinds: the rules follow at once,
    # and the old address is an unbound source from then on
    a.host.run(["wg", "set", a.host.wg_ifname, "listen-port", str(WG_PORT + 1)])
    bind_pair(key, a, b, listen_port=WG_PORT + 1)
    assert pings(a, "b"), relay.output(tail=2000)
    bound = [e["elem"]["val"]["concat"] for e in set_elements(lab, "forwarded4")]
    assert len(bound) == 2 and all(side[1] != WG_PORT for side in bound if side[2] == port)
    unbound = counters(lab)["unbound_source"]
    send_raw(a, port, WG_PORT, transport_shaped, count=10)
    time.sleep(0.5)
    assert counters(lab)["unbound_source"] >= unbound + 10
    assert relay.alive()


def metric(lab: Lab, series: str) -> float:
    """One series of the relay's /metrics (0 when absent)."""
    text = lab.internet.run(["curl", "-sf", "-m", "5", "http://127.0.0.1:9091/metrics"]).stdout
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_quota_expiry_and_restart_after_kill(lab: Lab, key: SigningKey) -> None:
    relay = start_relay(lab, key, idle_timeout=5.0, bytes_per_second=20000, burst_bytes=20000)
    a, b = make_peer(lab, "a"), make_peer(lab, "b")
    bind_pair(key, a, b)
    assert pings(a, "b"), relay.output(tail=2000)
    poll(lambda: len(set_elements(lab, "kernel_ports")) == 2, timeout=10, what="pair installed")

    # ~50 kB/s of pings against a 20 kB/s quota: the kernel drops the excess
    flood = a.host.run(["ping", "-n", "-q", "-c", "100", "-i", "0.02", "-s", "1000",
                        TUNNEL["b"]], check=False, timeout=30)  # fmt: skip
    assert counters(lab)["over_bandwidth"] > 0, flood.stdout
    assert " 0% packet loss" not in flood.stdout, flood.stdout

    # idle: the allocation expires and its rules go (the tunnel stops)
    time.sleep(2)
    poll(lambda: not set_elements(lab, "kernel_ports"), timeout=20, what="rules removed")
    assert not side_counters(lab)
    assert not pings(a, "b", count=3)

    # bound again, then the relay is killed with -9: its table outlives it
    bind_pair(key, a, b)
    assert pings(a, "b")
    poll(lambda: len(set_elements(lab, "kernel_ports")) == 2, timeout=10, what="pair installed")
    relay.signal(signal.SIGKILL)
    relay.wait(10)
    assert len(set_elements(lab, "kernel_ports")) == 2

    # restarted: the old table is replaced (nothing forwarded), until the agents rebind
    relay = start_relay(lab, key, idle_timeout=30.0)
    assert not set_elements(lab, "kernel_ports") and not side_counters(lab)
    assert not pings(a, "b", count=3)
    bind_pair(key, a, b)
    assert pings(a, "b"), relay.output(tail=2000)
    poll(lambda: len(set_elements(lab, "kernel_ports")) == 2, timeout=10, what="pair installed")

    # the table deleted underneath (a firewall reload): rebuilt on the next timer tick
    lab.internet.run(["nft", "delete", "table", "inet", TABLE])
    poll(lambda: len(set_elements(lab, "kernel_ports")) == 2, timeout=15, what="table rebuilt")
    assert pings(a, "b")

    # SIGTERM: the relay removes its table on the way out
    relay.signal(signal.SIGTERM)
    relay.wait(15)
    assert table(lab) == {}


_DOCUMENTS = """
import hashlib, pathlib, sys
from aiohttp import web
root = pathlib.Path(sys.argv[1])

async def serve(request):
    body = (root / request.match_info["name"]).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

app = web.Application()
app.router.add_get("/api/v1/relay/{name:signers|revocations}", serve)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None)
"""


def serve_documents(lab: Lab, key: SigningKey) -> Any:
    """The gateway's signers and (empty) revocation documents, from files in a directory."""
    root = lab.workdir / "gateway-documents"
    root.mkdir(exist_ok=True)
    public = base64.b64encode(bytes(key.verify_key)).decode()
    (root / "signers").write_text(
        json.dumps({"signers": [{"public_key": public, "tenants": [TENANT]}]})
    )
    (root / "revocations").write_text(json.dumps({"revoked": [], "window": 360}))
    port = GATEWAY.rsplit(":", 1)[1]
    lab.internet.spawn([sys.executable, "-c", _DOCUMENTS, str(root), port], name="documents")
    url = f"http://{GATEWAY}/api/v1/relay/signers"
    poll(
        lambda: lab.internet.run(["curl", "-sf", "-m", "2", url], check=False).returncode == 0,
        timeout=15,
        what="documents served",
    )
    return root


def test_a_revoked_device_loses_its_kernel_rules_within_the_bound(
    lab: Lab, key: SigningKey
) -> None:
    root = serve_documents(lab, key)
    relay = start_relay(lab, key, signers_url=f"http://{GATEWAY}/api/v1/relay/signers")
    poll(lambda: "relay signers loaded" in relay.output(), timeout=15, what="signers loaded")
    a, b = make_peer(lab, "a"), make_peer(lab, "b")
    early = issue_pair(key, relay_id="r1", tenant=TENANT, node_a=a.node, node_b=b.node,
                       now=time.time() - 2)  # fmt: skip
    bind_pair(key, a, b)
    assert pings(a, "b"), relay.output(tail=2000)
    poll(lambda: len(set_elements(lab, "kernel_ports")) == 2, timeout=10, what="pair installed")

    # b is removed at the gateway: the relay's next poll releases the pair, the kernel
    # path's reconcile deletes its elements and conntrack entries; the tunnel stops
    revoked = {"tenant": TENANT, "device_id": b.node.device_id, "revoked_at": time.time()}
    (root / "revocations").write_text(json.dumps({"revoked": [revoked], "window": 360}))
    started = time.monotonic()
    poll(lambda: not set_elements(lab, "kernel_ports"), timeout=10, interval=0.05,
         what="revoked pair's rules removed")  # fmt: skip
    latency = time.monotonic() - started
    assert latency < REVOCATION_BOUND, latency
    assert not side_counters(lab)
    assert not pings(a, "b", count=3)
    assert metric(lab, 'wiregate_relay_datagrams_total{outcome="revoked"}') == 1

    # a ticket naming b issued before the removal is refused (it may not bind again)
    out = a.host.run([sys.executable, "-c", _BIND, RELAY, str(CONTROL), str(WG_PORT)],
                     input=early[0].hex(), timeout=30, check=False)  # fmt: skip
    assert out.returncode != 0 and "ticket_revoked" in out.stdout + out.stderr, out
    assert metric(lab, 'wiregate_relay_datagrams_total{outcome="ticket_revoked"}') >= 1
    assert not set_elements(lab, "kernel_ports")
    print(f"revocation to rules removed: {latency:.2f} s")

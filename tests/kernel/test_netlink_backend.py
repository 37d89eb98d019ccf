"""The kernel backend against the real WireGuard module (run under QEMU, see LAB.md).

    vng --run /boot/vmlinuz-* --user root --disable-kvm \\
        --exec "modprobe wireguard && .venv/bin/python -m pytest tests/kernel -m kernel -q"
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dataplane.backend import DeviceUpdate, LiveDevice, PeerUpdate
from agent.dataplane.desired import DesiredDevice, DesiredPeer
from agent.dataplane.netlink import NetlinkBackend
from agent.dataplane.reconcile import diff
from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


def pub() -> str:
    return encode_key(public_from_private(generate_private_key()))


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


@pytest.fixture
def iface() -> Iterator[str]:
    name = f"wgk{secrets.token_hex(3)}"
    backend = NetlinkBackend()
    try:
        backend.create(name)
        yield name
    finally:
        backend.delete(name)
        backend.close()


def test_a_thousand_peers_in_batched_messages(iface: str) -> None:
    """One write of 1 000 peers goes out as a few messages of many peers each, and the
    kernel holds every peer with its endpoint and allowed IPs afterwards."""
    backend = NetlinkBackend()
    keys = [pub() for _ in range(1000)]
    peers = tuple(
        PeerUpdate(
            k,
            endpoint=f"198.51.100.{i % 250 + 1}:{20000 + i}",
            keepalive=25,
            allowed_ips=frozenset(
                {net(f"100.64.{i // 250}.{i % 250}/32"), net(f"fd7a::{i:x}/128")}
            ),
        )
        for i, k in enumerate(keys)
    )
    update = DeviceUpdate(private_key=generate_private_key(), listen_port=51998, peers=peers)
    try:
        count = backend.write(iface, update)
        assert 1 < count < 50
        live = backend.read(iface)
        assert set(live.peers) == set(keys)
        for i, k in enumerate(keys):
            assert live.peers[k].endpoint == f"198.51.100.{i % 250 + 1}:{20000 + i}"
            assert len(live.peers[k].allowed_ips) == 2
    finally:
        backend.close()


def test_roundtrip_and_write_counts(iface: str) -> None:
    backend = NetlinkBackend()
    private = generate_private_key()
    k1, k2 = pub(), pub()
    want = DesiredDevice(
        private,
        51999,
        0xCA6C,
        peers={
            k1: DesiredPeer(k1, frozenset({net("100.64.0.2/32")}), "192.0.2.2:51820", 25),
            k2: DesiredPeer(k2, frozenset({net("10.0.0.0/8"), net("fd7a::/64")}), None, 0),
        },
    )
    update = diff(want, backend.read(iface), None)
    assert backend.write(iface, update) == 1  # one message: the device fields and both peers
    live = backend.read(iface)
    assert live.public_key == encode_key(public_from_private(private))
    assert live.listen_port == 51999 and live.fwmark == 0xCA6C
    assert live.peers[k1].endpoint == "192.0.2.2:51820" and live.peers[k1].keepalive == 25
    assert live.peers[k2].allowed_ips == {net("10.0.0.0/8"), net("fd7a::/64")}
    assert diff(want, live, want).is_empty
    assert backend.write(iface, DeviceUpdate()) == 0

    changed = PeerUpdate(k2, update_only=True, allowed_ips=frozenset({net("10.1.0.0/16")}))
    assert backend.write(iface, DeviceUpdate(peers=(PeerUpdate(k1, remove=True), changed))) == 1
    live = backend.read(iface)
    assert set(live.peers) == {k2}
    assert live.peers[k2].allowed_ips == {net("10.1.0.0/16")}
    backend.close()


def test_many_peers_span_several_dump_messages(iface: str) -> None:
    backend = NetlinkBackend()
    peers = tuple(
        PeerUpdate(
            pub(),
            allowed_ips=frozenset(
                {net(f"100.64.{i}.{j}/32") for j in range(1, 40)} | {net(f"10.{i}.0.0/16")}
            ),
        )
        for i in range(60)
    )
    backend.write(iface, DeviceUpdate(private_key=generate_private_key(), peers=peers))
    live: LiveDevice = backend.read(iface)
    assert len(live.peers) == 60
    assert all(len(p.allowed_ips) == 40 for p in live.peers.values())
    backend.close()


NODE = r"""
import json, sys, base64
from pathlib import Path
from agent.dataplane.facade import DataPlane
from wiregate.mapwire import read_full
cfg = json.loads(sys.stdin.read())
dp = DataPlane(interface=cfg["iface"], private_key=base64.b64decode(cfg["key"]), listen_port=51820,
               fwmark=0xCA6C, table=51820, rule_priority=5210, run_dir=Path(cfg["run_dir"]))
dp.setup()
r = dp.apply(read_full(cfg["map"]))
print(json.dumps({"backend": dp.backend_name, "writes": r.writes, "problems": list(r.problems)}))
"""


def _node(ns: str, cfg: dict[str, object]) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", NODE],
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_dataplane_tunnel_between_namespaces(tmp_path: Path) -> None:
    tag = secrets.token_hex(2)
    names = {"a": f"wgka{tag}", "b": f"wgkb{tag}"}
    keys = {s: generate_private_key() for s in "ab"}
    ips = {"a": "1", "b": "2"}
    try:
        for ns in names.values():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                f"vka{tag}",
                "netns",
                names["a"],
                "type",
                "veth",
                "peer",
                "name",
                f"vkb{tag}",
                "netns",
                names["b"],
            ],
            check=True,
        )
        for s, ns in names.items():
            subprocess.run(
                ["ip", "-n", ns, "addr", "add", f"192.0.2.{ips[s]}/24", "dev", f"vk{s}{tag}"],
                check=True,
            )
            subprocess.run(["ip", "-n", ns, "link", "set", f"vk{s}{tag}", "up"], check=True)

        def wire(s: str) -> dict[str, object]:
            cidrs = [f"100.64.0.{ips[s]}/32", f"fd7a:7767:6174::{ips[s]}/128"]
            return {
                "id": s,
                "name": s,
                "public_key": encode_key(public_from_private(keys[s])),
                "addresses": cidrs,
                "allowed_ips": cidrs,
                "endpoints": [f"192.0.2.{ips[s]}:51820"],
                "keepalive": None,
                "tags": [],
            }

        results = {}
        for s, other in (("a", "b"), ("b", "a")):
            me = wire(s)
            netmap = {
                "version": 1,
                "peers": [wire(other)],
                "self": {k: me[k] for k in ("id", "name", "public_key", "addresses")},
            }
            cfg = {
                "iface": f"wgk{s}{tag}",
                "key": base64.b64encode(keys[s]).decode(),
                "run_dir": str(tmp_path / s),
                "map": netmap,
            }
            results[s] = (cfg, _node(names[s], cfg))
        assert results["a"][1]["backend"] == "kernel"
        ping = subprocess.run(
            ["ip", "netns", "exec", names["a"], "ping", "-c", "2", "-W", "3", "100.64.0.2"],
            capture_output=True,
            check=False,
        )
        assert ping.returncode == 0, ping.stdout
        # a restarted agent (fresh process) adopts the interface and writes nothing
        again = _node(names["a"], results["a"][0])
        assert again["writes"] == 0 and again["backend"] == "kernel"
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_reads_from_a_running_event_loop_and_writes_from_worker_threads(iface: str) -> None:
    """The agent's pattern: status reads on the event loop, applies in to_thread workers.

    pyroute2's synchronous API failed when called on a thread with a running loop
    ("This event loop is already running") and its socket then answered ECONNRESET
    to every later call, so the next apply failed and the agent exited.
    """

    async def agent() -> LiveDevice:
        backend = NetlinkBackend()  # made on the loop's thread, as the agent's data plane is
        try:
            assert backend.read(iface).peers == {}
            k = pub()
            update = DeviceUpdate(
                peers=(PeerUpdate(k, allowed_ips=frozenset({net("10.9.0.0/24")})),)
            )
            await asyncio.to_thread(backend.write, iface, update)
            assert set(backend.read(iface).peers) == {k}
            await asyncio.to_thread(
                backend.write, iface, DeviceUpdate(peers=(PeerUpdate(k, remove=True),))
            )
            return await asyncio.to_thread(backend.read, iface)
        finally:
            backend.close()

    assert asyncio.run(agent()).peers == {}

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
from agent.dataplane.facade import DataPlane
from agent.dataplane.netlink import NetlinkBackend
from agent.dataplane.reconcile import diff
from wiregate.keys import encode_key, generate_private_key, public_from_private
from wiregate.model import NetMap, Peer, SelfView

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
            own = {k: me[k] for k in ("id", "name", "public_key", "addresses")}
            netmap: dict[str, object] = {
                "version": 1,
                "peers": [wire(other)],
                "self": {**own, "pool": list(POOL)},
            }
            cfg: dict[str, object] = {
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
        _pool_routed(names["a"], f"wgka{tag}", "vka" + tag)
        # a restarted agent (fresh process) adopts the interface and writes nothing
        again = _node(names["a"], results["a"][0])
        assert again["writes"] == 0 and again["backend"] == "kernel"
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)


POOL = ("100.64.0.0/16", "fd7a:7767:6174::/64")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _table(*args: str, table: int = 51820) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The destinations in ``table`` (``args``: ``-n NS`` to look in a namespace)."""
    found = set()
    for family in ("-4", "-6"):
        out = subprocess.run(["ip", *args, family, "-j", "route", "show", "table", str(table)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        found |= {net(r["dst"]) for r in json.loads(out or "[]")}
    return found


def _pool_routed(ns: str, wg: str, veth: str) -> None:
    """The pool is one route per family to the interface; traffic to a pool address no
    peer holds goes to WireGuard (which answers unreachable), not to the default route,
    and WireGuard's own marked traffic still takes the default route."""
    assert _table("-n", ns) == {net(p) for p in POOL}
    ping6 = _ip("netns", "exec", ns, "ping", "-6", "-c", "2", "-W", "3", "fd7a:7767:6174::2")
    assert ping6.returncode == 0, ping6.stdout
    subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", "192.0.2.2"], check=True)
    for family, lost in (("-4", "100.64.0.99"), ("-6", "fd7a:7767:6174::99")):
        route = _ip("-n", ns, family, "route", "get", lost).stdout
        assert f"dev {wg}" in route, route
    marked = _ip("-n", ns, "-4", "route", "get", "100.64.0.99", "mark", "0xca6c").stdout
    assert f"dev {veth}" in marked and "via 192.0.2.2" in marked, marked
    unreachable = _ip("netns", "exec", ns, "ping", "-c", "1", "-W", "2", "100.64.0.99")
    assert unreachable.returncode != 0, unreachable.stdout


def _map(private: bytes, peers: list[tuple[str, ...]], pool: tuple[str, ...]) -> NetMap:
    me = SelfView("me", "me", encode_key(public_from_private(private)),
                  ("100.64.0.1/32", "fd7a:7767:6174::1/128"), pool=pool)  # fmt: skip
    return NetMap(1, me, {
        f"d{i}": Peer(f"d{i}", f"p{i}", key, tuple(allowed[:2]), tuple(allowed))
        for i, (key, *allowed) in enumerate(peers)
    })  # fmt: skip


def test_the_pool_replaces_the_host_routes_and_back(tmp_path: Path) -> None:
    """An agent whose gateway starts sending the pool swaps 2 N host routes for two
    prefixes (the pool's added first, so no packet to a peer meets the main table),
    keeps the routes outside the pool, and goes back when the pool is gone."""
    name, table = f"wgp{secrets.token_hex(3)}", 51830
    private = generate_private_key()
    peers: list[tuple[str, ...]] = [
        (pub(), f"100.64.0.{i}/32", f"fd7a:7767:6174::{i:x}/128") for i in range(2, 22)
    ]
    peers.append((pub(), "100.64.1.2/32", "fd7a:7767:6174::102/128", "10.42.0.0/24"))
    dp = DataPlane(interface=name, private_key=private, listen_port=51990, fwmark=0xCA6D,
                   table=table, rule_priority=5230, backend="kernel", run_dir=tmp_path)  # fmt: skip
    every = {net(n) for _, *allowed in peers for n in allowed}
    pooled = {net(p) for p in POOL} | {net("10.42.0.0/24")}
    try:
        dp.setup()
        assert dp.backend_name == "kernel"
        dp.apply(_map(private, peers, ()))
        assert _table(table=table) == every
        result = dp.apply(_map(private, peers, POOL))
        assert _table(table=table) == pooled
        assert result.writes == 2 + 42  # the pool's two routes, 42 host routes gone
        assert dp.apply(_map(private, peers, POOL)).writes == 0
        route = _ip("route", "get", "100.64.7.7").stdout
        assert f"dev {name}" in route, route
        dp.apply(_map(private, peers, ()))
        assert _table(table=table) == every
    finally:
        dp.teardown()
    assert _table(table=table) == set()


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

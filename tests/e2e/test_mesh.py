"""End to end: the real ``wiregate`` CLI (gateway, agents, admin, status) in the lab.

Every test builds its own lab; on failure the lab fixture prints every gateway and
agent log.
"""

from __future__ import annotations

import re
import secrets
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from lab.capture import (
    IGMP,
    ND_TYPES,
    PATTERN,
    is_control_plane,
    is_wireguard,
    parse_frame,
    read_pcap,
    start_capture,
    stop_capture,
)
from lab.harness import (
    WG_PORT,
    Lab,
    Wiregate,
    poll,
    write_secret,
)
from lab.mesh import Mesh, unreachable_pairs, wg_peers
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]


# --------------------------------------------------------------------------- helpers


def peer_view(status: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(p["id"], p["public_key"], tuple(p["addresses"])) for p in status["peers"]}


def test_pcap_reader_sees_clear_icmp(lab: Lab, tmp_path: Path) -> None:
    """Control for the capture test: plain pings on the underlay are seen, pattern and all."""
    a, b = lab.add_host("a"), lab.add_host("b")
    pcap = tmp_path / "clear.pcap"
    capture = start_capture(a, pcap)
    assert a.run(["ping", "-n", "-c", "3", "-i", "0.2", "-s", "200", "-p", PATTERN.hex(), b.addr])
    stop_capture(capture, pcap, min_frames=6)
    packets = [p for f in read_pcap(pcap) if (p := parse_frame(f)) is not None]
    echoes = [p for p in packets if p.proto == 1 and p.icmp_type in (0, 8)]
    assert len(echoes) >= 6
    assert all(PATTERN in p.frame for p in echoes)


# --------------------------------------------------------------------------- the mesh


def test_every_pair_pings_over_the_tunnel(mesh: Mesh) -> None:
    names = list(mesh.hosts)
    for name, status in mesh.statuses.items():
        v4, v6 = mesh.addresses(name)
        assert v4.startswith("100.64."), status["device"]
        assert v6.startswith("fd7a:7767:6174:"), status["device"]
        assert status["interface"] == mesh.agents[name].iface
        assert len(wg_peers(mesh.agents[name])) == len(names) - 1
    assert unreachable_pairs(mesh, names) == []
    secret = mesh.key_file.read_text().strip()
    for proc in mesh.lab.processes:
        assert secret not in proc.output(), f"{proc.name} logged the enrollment secret"
    # The pings really went through WireGuard: every peer has a handshake and traffic.
    now = time.time()
    for name, agent in mesh.agents.items():
        for peer in mesh.wiregate.status(agent)["peers"]:
            assert peer["last_handshake"] and now - peer["last_handshake"] < 120, (name, peer)
            assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0, (name, peer)
            assert peer["endpoint"] and peer["endpoint"].endswith(f":{WG_PORT}"), (name, peer)


def test_underlay_carries_only_wireguard(mesh: Mesh, tmp_path: Path) -> None:
    a, b = mesh.hosts["a"], mesh.hosts["b"]
    b_v4 = mesh.addresses("b")[0]
    assert ping_until(a, b_v4), "tunnel not up before the capture"
    pcap = tmp_path / "underlay.pcap"
    capture = start_capture(a, pcap)
    a.run(["ping", "-n", "-c", "5", "-i", "0.2", "-s", "200", "-p", PATTERN.hex(), b_v4])
    stop_capture(capture, pcap, min_frames=10)
    packets = [p for f in read_pcap(pcap) if (p := parse_frame(f)) is not None]
    assert not [f for f in read_pcap(pcap) if PATTERN in f], "ping payload seen in clear"
    icmp = [p for p in packets if p.proto == 1 or (p.proto == 58 and p.icmp_type not in ND_TYPES)]
    assert icmp == [], f"ICMP on the underlay: {icmp[:3]}"
    other = [p for p in packets if not is_wireguard(p) and not is_control_plane(p)]
    other = [p for p in other if p.proto != IGMP]
    other = [p for p in other if not (p.proto == 58 and p.icmp_type in ND_TYPES)]
    assert other == [], f"non-WireGuard traffic on the underlay: {other[:3]}"
    to_b = [p for p in packets if is_wireguard(p) and p.dst == b.addr and len(p.frame) > 200]
    from_b = [p for p in packets if is_wireguard(p) and p.src == b.addr and len(p.frame) > 200]
    assert len(to_b) >= 5 and len(from_b) >= 5, "the pings did not cross the underlay as UDP"


def test_removed_device_disappears_from_every_peer(mesh: Mesh) -> None:
    gone = mesh.agents["d"]
    gone_id = mesh.statuses["d"]["device"]["id"]
    gone_key = mesh.statuses["d"]["device"]["public_key"]
    assert all(gone_key in wg_peers(mesh.agents[n]) for n in "abc")
    mesh.wiregate.admin("devices", "remove", gone_id)
    remaining = [mesh.agents[n] for n in "abc"]
    poll(lambda: all(gone_key not in wg_peers(a) for a in remaining), timeout=10,
         what="the removed peer to leave every interface")  # fmt: skip
    assert all(len(wg_peers(a)) == 2 for a in remaining)

    def interface_gone() -> bool:
        probe = gone.host.run(["ip", "link", "show", gone.iface], check=False)
        return probe.returncode != 0

    poll(interface_gone, timeout=10, what=f"{gone.iface} to be torn down")
    assert gone_id not in {d["id"] for d in mesh.wiregate.devices()}
    assert not mesh.hosts["a"].ping(mesh.addresses("d")[0], timeout=1)
    assert unreachable_pairs(mesh, ["a", "b", "c"]) == []


def test_gateway_restart_fails_static_then_resyncs(mesh: Mesh) -> None:
    before = {name: peer_view(st) for name, st in mesh.statuses.items()}
    gateway = mesh.wiregate.gateway
    assert gateway is not None
    gateway.signal(signal.SIGKILL)
    gateway.wait(timeout=10)

    def all_disconnected() -> bool:
        statuses = mesh.wiregate.statuses(list(mesh.agents.values())).values()
        return not any(s["gateway"]["connected"] for s in statuses)

    poll(all_disconnected, timeout=30, what="agents to notice the gateway is gone")
    assert unreachable_pairs(mesh, list(mesh.hosts)) == [], "data plane did not fail static"

    mesh.wiregate.start_gateway()
    after = mesh.refresh(timeout=90)
    assert all(st["gateway"]["connected"] for st in after.values())
    assert {name: peer_view(st) for name, st in after.items()} == before
    assert unreachable_pairs(mesh, list(mesh.hosts)) == []


def test_agent_restart_keeps_key_and_addresses(mesh: Mesh) -> None:
    agent = mesh.agents["b"]
    before = mesh.statuses["b"]["device"]
    key_file = agent.state_dir / "private.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert agent.proc is not None
    agent.proc.signal(signal.SIGTERM)
    agent.proc.wait(timeout=15)

    mesh.wiregate.start_agent(agent.host)
    after = mesh.refresh(timeout=90)["b"]["device"]
    assert after["public_key"] == before["public_key"]
    assert after["id"] == before["id"]
    assert after["addresses"] == before["addresses"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(mesh.wiregate.devices()) == len(mesh.agents), "the restart enrolled a new device"
    failed = [f for f in unreachable_pairs(mesh, list(mesh.hosts)) if "b" in f.split()[0]]
    assert failed == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", ["unknown", "expired"])
def test_agent_with_bad_enrollment_key_exits_clearly(
    lab: Lab, gateway: Wiregate, kind: str
) -> None:
    host = lab.add_host("bad")
    devices_before = gateway.devices()
    if kind == "unknown":
        key_file = lab.workdir / "unknown-key"
        write_secret(key_file, "wgk_" + secrets.token_urlsafe(32))
    else:
        key_file = gateway.create_key(expiry="1s", reusable=False)
        time.sleep(2.5)
    secret = key_file.read_text().strip()
    agent = gateway.start_agent(host, key_file)
    assert agent.proc is not None
    proc = agent.proc
    poll(lambda: proc.returncode is not None, timeout=30, what="the agent to give up")
    output = proc.output()
    assert proc.returncode != 0, output
    assert "Traceback (most recent call last)" not in output, output
    assert re.search(r"(?i)\bkey\b|enrol", output), f"no clear message: {output!r}"
    assert secret not in output, "the agent logged the enrollment secret"
    assert gateway.devices() == devices_before
    assert host.run(["ip", "link", "show", agent.iface], check=False).returncode != 0

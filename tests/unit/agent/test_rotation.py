"""The agent's key rotation (agent.rotation) on the in-memory data plane, and the
rotate call against the real gateway app."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestServer

from agent.dataplane.backend import MemoryBackend
from agent.dataplane.facade import DataPlane
from agent.keyfile import KEY_FILE, load_or_create_key
from agent.rotation import NEXT_KEY_FILE, ROTATION_GRACE, KeyRotator, nudge
from agent.session import MapSession
from agent.state import Enrollment
from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.lifecycle.expiry import people_lifetime
from gateway.store import EnrollRequest, KeySpec
from gateway.store.records import ENROLLMENT_ISSUER
from lab.api_client import RecordingBroker, make_settings
from lab.dataplane_fakes import IFACE, MemoryLinks
from lab.fakes import FakeClock, new_key
from wiregate.keylife import rotate_after
from wiregate.keys import encode_key, public_from_private
from wiregate.model import Identity, NetMap, Peer, SelfView

KEY1 = new_key()


def pub(private: bytes) -> str:
    return encode_key(public_from_private(private))


@dataclass
class Settings:
    state_dir: Path
    server: str = "http://127.0.0.1:1"
    rotation_check_interval: float = 3600.0
    ca_file: Path | None = None


@dataclass
class FakeAgent:
    settings: Settings
    public_key: str
    dataplane: Any
    session: MapSession = field(default_factory=MapSession)
    enrollment: Enrollment | None = None

    def gateway_url(self) -> str:
        return str(self.settings.server).rstrip("/")


def peer(i: int, key: str) -> Peer:
    ips = (f"127.0.0.{i + 2}/32", f"fd7a:7767:6174::{i + 2:x}/128")
    return Peer(id=f"d{i}", name=f"p{i}", public_key=key, addresses=ips, allowed_ips=ips)


def netmap(self_key: str, peers: list[Peer], version: int = 1, **self_extra: Any) -> NetMap:
    me = SelfView("me", "me", self_key, ("100.64.0.1/32",), **self_extra)
    return NetMap(version=version, self_view=me, peers={p.id: p for p in peers})


def make_agent(tmp_path: Path) -> tuple[FakeAgent, MemoryBackend]:
    private = load_or_create_key(tmp_path)
    backend = MemoryBackend()
    backend.create(IFACE)
    dp = DataPlane(interface=IFACE, private_key=private, listen_port=51820, fwmark=0xCA6C,
                   table=51820, rule_priority=5210, mtu=1420, run_dir=Path("/nonexistent"),
                   wireguard=backend, links=MemoryLinks())  # fmt: skip
    dp.setup()
    return FakeAgent(Settings(tmp_path), pub(private), dp), backend


async def apply(agent: FakeAgent, rotator: KeyRotator, nm: NetMap) -> None:
    agent.session = MapSession(nm)
    await rotator.before_apply(nm)
    agent.dataplane.apply(nm)
    await rotator.after_apply(nm)


async def test_switch_when_the_map_names_the_next_key(tmp_path: Path) -> None:
    agent, backend = make_agent(tmp_path)
    rotator = KeyRotator(agent)
    old = agent.public_key
    peers = [peer(0, new_key())]
    await apply(agent, rotator, netmap(old, peers))
    assert backend.read(IFACE).public_key == old
    nxt = load_or_create_key(tmp_path, NEXT_KEY_FILE)
    assert stat.S_IMODE((tmp_path / NEXT_KEY_FILE).stat().st_mode) == 0o600
    await apply(agent, rotator, netmap(pub(nxt), peers, 2, previous_public_key=old))
    assert backend.read(IFACE).public_key == pub(nxt) == agent.public_key
    assert load_or_create_key(tmp_path) == nxt  # private.key is now the next key
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    assert set(backend.read(IFACE).peers) == {peers[0].public_key}  # peers untouched
    assert rotator.last_rotation is not None


async def test_a_key_the_agent_does_not_hold_is_not_switched_to(tmp_path: Path) -> None:
    agent, backend = make_agent(tmp_path)
    rotator = KeyRotator(agent)
    old = agent.public_key
    load_or_create_key(tmp_path, NEXT_KEY_FILE)  # a next key, but not the one named
    await apply(agent, rotator, netmap(new_key(), []))
    assert backend.read(IFACE).public_key == old == agent.public_key
    assert (tmp_path / NEXT_KEY_FILE).exists()


def test_due_at_two_thirds_of_the_lifetime(tmp_path: Path) -> None:
    agent, _ = make_agent(tmp_path)
    rotator = KeyRotator(agent)
    assert rotator.due_at() is None  # no map yet
    issued = 1_000_000.0
    os.utime(tmp_path / KEY_FILE, (issued, issued))
    agent.session = MapSession(netmap(agent.public_key, [], expires_at=issued + 300.0))
    assert rotator.due_at() == pytest.approx(issued + 200.0)
    agent.session = MapSession(netmap(agent.public_key, []))
    assert rotator.due_at() is None  # keys without expiry are rotated only on demand


async def test_peers_whose_key_changed_are_nudged(tmp_path: Path, monkeypatch: Any) -> None:
    agent, _ = make_agent(tmp_path)
    rotator = KeyRotator(agent)
    nudged: list[list[str]] = []
    monkeypatch.setattr("agent.rotation.nudge", lambda ps: nudged.append(
        [p.id for p in ps]))  # fmt: skip
    a, b = peer(0, new_key()), peer(1, new_key())
    await apply(agent, rotator, netmap(agent.public_key, [a, b]))
    assert nudged == []  # first map: nothing changed
    await apply(agent, rotator, netmap(agent.public_key, [a, replace(b, public_key=new_key())]))
    assert nudged == [["d1"]]


async def test_a_peer_waits_for_the_rotating_device_to_switch_first(
    tmp_path: Path, monkeypatch: Any
) -> None:
    agent, backend = make_agent(tmp_path)
    rotator = KeyRotator(agent)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("agent.rotation.asyncio.sleep", sleep)
    monkeypatch.setattr("agent.rotation.nudge", lambda ps: 0)
    a = peer(0, new_key())
    await apply(agent, rotator, netmap(agent.public_key, [a]))
    await apply(agent, rotator, netmap(agent.public_key, [a, peer(1, KEY1)]))
    assert slept == []  # a new peer is no rotation
    rotated = replace(a, public_key=new_key())
    await apply(agent, rotator, netmap(agent.public_key, [rotated, peer(1, KEY1)]))
    assert slept == [ROTATION_GRACE]
    assert rotated.public_key in backend.read(IFACE).peers


def test_nudge_sends_one_datagram_per_peer(monkeypatch: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.2", 0))
        monkeypatch.setattr("agent.rotation.NUDGE_PORT", listener.getsockname()[1])
        assert nudge([peer(0, new_key())]) == 1
        listener.settimeout(2)
        assert listener.recvfrom(16)[0] == b"\x00"


async def test_rotate_registers_the_next_key_with_the_gateway(tmp_path: Path) -> None:
    clock = FakeClock()
    (tmp_path / "gw").mkdir()
    app = create_app(make_settings(tmp_path / "gw"), broker_factory=lambda _p: RecordingBroker(),
                     clock=clock)  # fmt: skip
    async with TestServer(app) as server:
        store = app[STORE]
        _, secret = await store.create_key(KeySpec())
        agent, _ = make_agent(tmp_path / "agent")
        enrolled = await store.enroll(secret, EnrollRequest(agent.public_key, "vm"))
        agent.enrollment = Enrollment(enrolled.record.device.id, "vm", (), enrolled.token)
        agent.settings.server = str(server.make_url(""))
        agent.session = MapSession(netmap(agent.public_key, []))
        rotator = KeyRotator(agent)
        with structlog.testing.capture_logs() as logs:
            new = await rotator.rotate()
        assert new == pub(load_or_create_key(tmp_path / "agent", NEXT_KEY_FILE))
        record = await store.get_device(enrolled.record.device.id)
        assert record.device.public_key == new
        assert record.previous_public_key == agent.public_key
        private_text = (tmp_path / "agent" / NEXT_KEY_FILE).read_text().strip()
        assert private_text not in repr(logs)
        # the call went through but the answer was lost: the same key again is fine
        agent.session = MapSession(netmap(new, []))
        clock.now += 60
        assert await rotator.rotate() == new


def test_key_lifetimes() -> None:
    person, node = Identity("https://idp.example", "alice"), Identity(ENROLLMENT_ISSUER, "key_1")
    assert people_lifetime(3600.0)(person, ()) == 3600.0
    assert people_lifetime(3600.0)(node, ()) is None
    assert people_lifetime(0)(person, ()) is None  # 0: never
    assert people_lifetime(None)(person, ()) is None
    assert rotate_after(100.0, 400.0) == pytest.approx(300.0)
    assert rotate_after(100.0, None) is None

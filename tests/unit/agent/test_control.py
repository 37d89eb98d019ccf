"""The agent's control channel: request parsing, whois over a map, the up/down switch,
and the local socket (real unix socket, 0600) with its JSON errors."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.control import (
    TunnelSwitch,
    call_agent,
    control_routes,
    forget_prefs,
    load_wanted,
    parse_request,
    save_wanted,
    whois,
    with_owner,
)
from agent.status import serve_status
from wiregate.errors import BadInput, LocalError, NotFound, Unavailable, WiregateError
from wiregate.model import NetMap, Peer, SelfView

KEY = "A" * 43 + "="


def peer(n: int, routes: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> Peer:
    addresses = (f"100.64.0.{n}/32", f"fd7a:7767:6174::{n}/128")
    return Peer(f"d{n}", f"host{n}", KEY, addresses, addresses + routes, tags=tags)


def netmap() -> NetMap:
    me = SelfView("d1", "me", KEY, ("100.64.0.1/32", "fd7a:7767:6174::1/128"), tags=("tag:me",))
    peers = {
        "d2": peer(2, routes=("10.20.0.0/16",), tags=("tag:k8s",)),
        "d3": peer(3, routes=("10.20.30.0/24",)),
    }
    return NetMap(7, me, peers)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("op", ["up", "down", "logout"])
def test_parse_request_accepts_the_three_ops(op: str) -> None:
    assert parse_request(f'{{"op": "{op}"}}'.encode()) == op


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"op": "reboot"}',
        b'{"op": "down", "extra": 1}',
        b'["down"]',
        b'{"op": 1}',
        '{"op": "down"}'.encode("utf-16"),
        b'{"op": "' + b"d" * 2000 + b'"}',
    ],
)
def test_parse_request_refuses_anything_else(body: bytes) -> None:
    with pytest.raises(BadInput):
        parse_request(body)


# --------------------------------------------------------------------------- whois


def test_whois_tunnel_address_of_a_peer() -> None:
    doc = whois(netmap(), "100.64.0.2")
    assert doc["kind"] == "tunnel" and doc["match"] == "100.64.0.2/32"
    assert doc["device"]["name"] == "host2" and doc["device"]["tags"] == ["tag:k8s"]
    assert doc["tagged"] is True and doc["owner"] is None  # the map does not say
    v6 = whois(netmap(), "fd7a:7767:6174::3")
    assert v6["device"]["id"] == "d3" and v6["tagged"] is False


def test_whois_routed_prefix_picks_the_most_specific_route() -> None:
    assert whois(netmap(), "10.20.1.1")["device"]["id"] == "d2"
    inner = whois(netmap(), "10.20.30.5")
    assert inner["device"]["id"] == "d3" and inner["kind"] == "route"
    assert inner["match"] == "10.20.30.0/24"
    assert whois(netmap(), "10.20.30.0/25")["device"]["id"] == "d3"
    assert whois(netmap(), "10.20.0.0/16")["device"]["id"] == "d2"


OWNER = {"issuer": "https://idp.example", "subject": "alice", "kind": "person", "via": "corp"}


async def test_with_owner_adds_the_gateways_answer_for_the_matched_device() -> None:
    asked: list[str] = []

    async def owner_of(device_id: str) -> dict[str, Any]:
        asked.append(device_id)
        return {"device": {"id": device_id}, "owner": OWNER}

    doc = await with_owner(whois(netmap(), "10.20.30.5"), owner_of)
    assert asked == ["d3"] and doc["owner"] == OWNER and "owner_note" not in doc


async def test_with_owner_says_why_when_the_gateway_cannot_answer() -> None:
    async def owner_of(device_id: str) -> dict[str, Any]:
        raise Unavailable("cannot reach the gateway at https://gw.example")

    doc = await with_owner(whois(netmap(), "100.64.0.2"), owner_of)
    assert doc["owner"] is None and doc["device"]["id"] == "d2"
    assert "cannot reach the gateway" in doc["owner_note"]


def test_whois_self() -> None:
    doc = whois(netmap(), "100.64.0.1")
    assert doc["kind"] == "self" and doc["device"]["id"] == "d1"


@pytest.mark.parametrize("address", ["100.64.0.9", "10.21.0.1", "10.0.0.0/8", "fd00::1"])
def test_whois_unknown_address_is_not_found(address: str) -> None:
    with pytest.raises(NotFound):
        whois(netmap(), address)


def test_whois_refuses_non_addresses_and_needs_a_map() -> None:
    for bad in ("", "host2", "100.64.0.300", "../etc"):
        with pytest.raises(BadInput):
            whois(netmap(), bad)
    with pytest.raises(NotFound):
        whois(None, "100.64.0.2")


# --------------------------------------------------------------------------- prefs


def test_wanted_defaults_to_up_and_survives(tmp_path: Path) -> None:
    assert load_wanted(tmp_path) is True
    save_wanted(tmp_path, False)
    assert load_wanted(tmp_path) is False
    assert stat.S_IMODE((tmp_path / "prefs.json").stat().st_mode) == 0o600
    save_wanted(tmp_path, True)
    assert load_wanted(tmp_path) is True
    forget_prefs(tmp_path)
    assert not (tmp_path / "prefs.json").exists() and load_wanted(tmp_path) is True


def test_corrupt_prefs_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "prefs.json").write_text("{")
    with pytest.raises(LocalError, match=r"prefs\.json"):
        load_wanted(tmp_path)


# --------------------------------------------------------------------------- the switch


class FakeTunnel:
    """Records runs and teardowns; a run lasts until cancelled (or fails when told)."""

    def __init__(self) -> None:
        self.runs = 0
        self.cancelled = 0
        self.teardowns = 0
        self.running = asyncio.Event()
        self.fail: Exception | None = None

    async def run(self) -> None:
        self.runs += 1
        self.running.set()
        if self.fail is not None:
            raise self.fail
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.running.clear()
            raise

    async def tear_down(self) -> None:
        self.teardowns += 1


async def test_switch_down_tears_down_and_up_runs_again() -> None:
    t = FakeTunnel()
    switch = TunnelSwitch(True, t.run, t.tear_down)
    task = asyncio.create_task(switch.run())
    await asyncio.wait_for(t.running.wait(), 2)
    await switch.set(False)
    assert (t.runs, t.cancelled, t.teardowns) == (1, 1, 1)
    await switch.set(False)  # down while down: nothing more
    assert t.teardowns == 1
    await switch.set(True)
    await asyncio.wait_for(t.running.wait(), 2)
    assert t.runs == 2
    await switch.set(True)  # up while up: the same tunnel
    assert t.runs == 2
    switch.stop()
    await asyncio.wait_for(task, 2)
    assert t.teardowns == 2  # stopped (logout) while up: torn down


async def test_switch_starting_down_waits_for_up() -> None:
    t = FakeTunnel()
    switch = TunnelSwitch(False, t.run, t.tear_down)
    task = asyncio.create_task(switch.run())
    await asyncio.sleep(0.05)
    assert t.runs == 0 and t.teardowns == 0
    await switch.set(True)
    await asyncio.wait_for(t.running.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_the_switch_leaves_the_tunnel_up() -> None:
    """SIGTERM of the agent: the tunnel task ends, nothing is torn down (fail static)."""
    t = FakeTunnel()
    switch = TunnelSwitch(True, t.run, t.tear_down)
    task = asyncio.create_task(switch.run())
    await asyncio.wait_for(t.running.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert t.cancelled == 1 and t.teardowns == 0


async def test_a_tunnel_error_ends_the_switch_and_its_waiters() -> None:
    t = FakeTunnel()
    t.fail = Unavailable("revoked")
    switch = TunnelSwitch(False, t.run, t.tear_down)
    task = asyncio.create_task(switch.run())
    waiter = asyncio.create_task(switch.set(True))
    with pytest.raises(Unavailable, match="revoked"):
        await asyncio.wait_for(task, 2)
    await asyncio.sleep(0)
    assert waiter.done() and waiter.exception() is None  # the up was acted on
    with pytest.raises(Unavailable, match="stopping"):  # nothing left to act on a request
        await asyncio.wait_for(switch.set(False), 2)


# --------------------------------------------------------------------------- the socket


class FakeAgent:
    def __init__(self) -> None:
        self.ops: list[str] = []

    async def handle_control(self, op: str) -> dict[str, Any]:
        self.ops.append(op)
        if op == "logout":
            raise Unavailable("the gateway is unreachable")
        return {"state": op, "interface": "wg0"}

    def current_map(self) -> NetMap | None:
        return netmap()

    async def owner_of(self, device_id: str) -> dict[str, Any]:
        return {"device": {"id": device_id}, "owner": {**OWNER, "subject": device_id}}

    def status(self) -> dict[str, Any]:
        return {"state": "up"}


async def test_socket_round_trip_and_json_errors(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "agent.sock"
    agent = FakeAgent()
    runner = await serve_status(sock, agent, control_routes(agent))
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert await call_agent(sock, "GET", "/status") == {"state": "up"}
        assert (await call_agent(sock, "POST", "/control", {"op": "down"}))["state"] == "down"
        who = await call_agent(sock, "GET", "/whois?address=10.20.30.1")
        assert who["device"]["id"] == "d3" and who["owner"]["subject"] == "d3"
        with pytest.raises(WiregateError) as refused:
            await call_agent(sock, "POST", "/control", {"op": "halt"})
        assert (refused.value.code, refused.value.status) == ("bad_input", 400)
        with pytest.raises(WiregateError) as missing:
            await call_agent(sock, "GET", "/whois?address=192.0.2.1")
        assert (missing.value.code, missing.value.status) == ("not_found", 404)
        with pytest.raises(WiregateError) as failed:
            await call_agent(sock, "POST", "/control", {"op": "logout"})
        assert failed.value.code == "unavailable" and "unreachable" in failed.value.message
        assert agent.ops == ["down", "logout"]
    finally:
        await runner.cleanup()


async def test_no_agent_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="no agent answers"):
        await call_agent(tmp_path / "agent.sock", "POST", "/control", {"op": "down"})

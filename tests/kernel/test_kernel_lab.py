"""The lab on kernel WireGuard: a gateway and three agents with ``--backend kernel``.

Runs inside the QEMU guest (``scripts/kernel-test.sh``), where the real module is
loaded: every agent's interface is a kernel ``wireguard`` link, the agents reach
each other over both families, a removed peer leaves the other interfaces without
disturbing the remaining sessions, and an agent that stops leaves its tunnel
working until it comes back and adopts the same interface.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pytest

from agent.status import fetch_status
from lab.harness import Agent, Lab, Wiregate, _run, poll
from lab.mesh import Mesh, unreachable_pairs, wg_peers

# slow: every Python process takes a minute or more to start under software emulation
pytestmark = [pytest.mark.kernel, pytest.mark.slow, pytest.mark.lab, pytest.mark.timeout(1800)]

HOSTS = ("a", "b", "c")
# Software emulation (no KVM) makes every process start several times slower.
SLOW = 240.0
REKEY_AFTER_S = 120  # WireGuard's REKEY_AFTER_TIME


@dataclass(frozen=True, slots=True)
class Session:
    """One peer as the kernel reports it (``wg show IFACE dump``)."""

    handshake: int
    rx: int
    tx: int


def sessions(agent: Agent) -> dict[str, Session]:
    """Public key → handshake time and byte counters of every peer on ``agent``'s interface."""
    lines = agent.host.run(["wg", "show", agent.iface, "dump"]).stdout.splitlines()[1:]
    out = {}
    for line in lines:
        fields = line.split("\t")
        out[fields[0]] = Session(int(fields[4]), int(fields[5]), int(fields[6]))
    return out


def link(agent: Agent) -> tuple[int, str | None]:
    """The interface's index and link kind (``wireguard`` for the kernel module)."""
    doc = json.loads(agent.host.run(["ip", "-d", "-j", "link", "show", agent.iface]).stdout)
    return int(doc[0]["ifindex"]), doc[0].get("linkinfo", {}).get("info_kind")


def assert_kept(before: Session, after: Session, what: str) -> None:
    """The kernel resets a peer's handshake and counters when it is removed and re-added.

    A session older than WireGuard's rekey time may legitimately have a newer handshake.
    """
    assert after.rx >= before.rx and after.tx >= before.tx, f"{what}: counters reset"
    if time.time() - before.handshake < REKEY_AFTER_S - 10:
        assert after.handshake == before.handshake, f"{what}: handshake reset"
    else:
        assert after.handshake >= before.handshake, f"{what}: handshake went back"


class SlowWiregate(Wiregate):
    """The harness with patience for the emulated guest.

    ``wiregate status`` is asked in-process over the agent's unix socket (the
    client the CLI uses), which saves a minute-long interpreter start per poll.
    """

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([*self.cmd, "admin", "--socket", str(self.admin_socket), *args],
                    check=check, timeout=SLOW)  # fmt: skip

    def status(self, agent: Agent) -> dict[str, Any]:
        return asyncio.run(fetch_status(agent.run_dir / "agent.sock"))


@pytest.fixture
def kernel_mesh(lab: Lab) -> Mesh:
    wiregate = SlowWiregate(lab)
    wiregate.start_gateway(timeout=SLOW)
    hosts = {name: lab.add_host(name) for name in HOSTS}
    key_file = wiregate.create_key(tags="tag:lab", expiry="1h", reusable=True)
    agents = {n: wiregate.start_agent(h, key_file, backend="kernel") for n, h in hosts.items()}
    try:
        statuses = wiregate.wait_mesh(list(agents.values()), timeout=SLOW)
    except TimeoutError:
        print(lab.logs())  # the lab fixture's log dump does not reach a setup error's report
        raise
    return Mesh(lab, wiregate, hosts, agents, key_file, statuses)


def test_kernel_lab_mesh_peer_change_and_fail_static_restart(kernel_mesh: Mesh) -> None:
    mesh = kernel_mesh
    a, b, c = (mesh.agents[n] for n in HOSTS)
    keys = {n: st["device"]["public_key"] for n, st in mesh.statuses.items()}
    for name, status in mesh.statuses.items():
        assert status["backend"] == "kernel", (name, status)
        assert link(mesh.agents[name])[1] == "wireguard", name
    assert unreachable_pairs(mesh, list(HOSTS), timeout=30) == []
    for name, agent in mesh.agents.items():
        live = sessions(agent)
        assert set(live) == {keys[n] for n in HOSTS if n != name}
        assert all(s.handshake > 0 and s.rx > 0 and s.tx > 0 for s in live.values()), (name, live)

    # One peer change, applied incrementally: c is removed; a and b drop it and keep
    # their session with each other (a re-added peer would start from zero).
    a_to_b = sessions(a)[keys["b"]]
    mesh.wiregate.admin("devices", "remove", mesh.statuses["c"]["device"]["id"])
    poll(lambda: all(keys["c"] not in wg_peers(x) for x in (a, b)), timeout=60,
         what="the removed peer to leave a and b")  # fmt: skip
    assert wg_peers(a) == {keys["b"]} and wg_peers(b) == {keys["a"]}
    assert_kept(a_to_b, sessions(a)[keys["b"]], "a's peer b after c's removal")
    poll(lambda: c.host.run(["ip", "link", "show", c.iface], check=False).returncode != 0,
         timeout=60, what="c's interface to be torn down")  # fmt: skip
    del mesh.agents["c"], mesh.hosts["c"]
    assert unreachable_pairs(mesh, ["a", "b"], timeout=30) == []

    # Fail static: b's agent stops; its kernel interface carries traffic without it.
    assert b.proc is not None
    b.proc.signal(signal.SIGTERM)
    assert b.proc.wait(timeout=SLOW) == 0, b.proc.output(3000)
    index, kind = link(b)
    assert kind == "wireguard"
    assert unreachable_pairs(mesh, ["a", "b"], timeout=30) == []
    assert sessions(b)[keys["a"]].rx > 0

    # The restarted agent adopts the interface (same link, same device) and the
    # tunnel carries traffic again. It does not keep the session: its path driver
    # probes every peer at start and resets the ones with a session (seen here:
    # b's peer a starts again from zero bytes and a new handshake).
    mesh.wiregate.start_agent(b.host, backend="kernel")
    after = mesh.refresh(timeout=SLOW)
    assert after["b"]["backend"] == "kernel"
    assert link(b) == (index, "wireguard"), "the restart re-created the interface"
    assert after["b"]["device"]["public_key"] == keys["b"]
    assert after["b"]["device"]["addresses"] == mesh.statuses["b"]["device"]["addresses"]
    assert unreachable_pairs(mesh, ["a", "b"], timeout=30) == []
    assert len(mesh.wiregate.devices()) == 2, "the restart enrolled a new device"

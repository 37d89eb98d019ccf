"""End to end: the everyday host commands in the lab, with real wireguard-go.

``wiregate up`` enrolls host a with a key file and starts its agent in the
background; then ``ip``, ``ping`` (direct), ``whois``, ``down`` (interface gone,
key and enrollment kept), ``up`` (same device and addresses, no new enrollment)
and ``logout`` (key and state gone, the device gone at the gateway).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from lab.harness import WG_PORT, Agent, Host, Lab, Wiregate, bare, poll
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(400)]


def cli(wiregate: Wiregate, host: Host, *args: str, check: bool = True) -> Any:
    """``wiregate ARGS --json`` on ``host``: its JSON document (success or error)."""
    done = host.run([*wiregate.cmd, *args, "--json"], check=False, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"wiregate {' '.join(args)} -> {done.returncode}: "
                             f"{done.stdout}{done.stderr}")  # fmt: skip
    return json.loads(done.stdout) if done.stdout.strip() else None


def link_exists(host: Host, iface: str) -> bool:
    probe = host.run(["ip", "link", "show", iface], check=False)
    return probe.returncode == 0


def agent_pid(host: Host, agent: Agent) -> int:
    """The pid of the ``wiregate agent`` that ``up`` started in the background."""
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in argv and str(agent.run_dir).encode() in argv:
            return pid
    raise AssertionError(f"no agent process on {host.name}")


def stop(host: Host, agent: Agent) -> None:
    pid = agent_pid(host, agent)
    os.kill(pid, signal.SIGTERM)
    poll(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=20,
         what="the agent to stop")  # fmt: skip


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def agent_log(agent: Agent) -> str:
    path = agent.run_dir / "agent.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"


def test_up_ip_ping_whois_down_up_logout(lab: Lab, gateway: Wiregate) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=True)
    peer_b = gateway.start_agent(b, key_file)
    me = Agent(a, lab.workdir / "agents" / "a", key_file)
    run = ["--run-dir", str(me.run_dir)]

    # -- up: enrolls with the key file, starts the agent in the background
    up = cli(gateway, a, "up", "--server", gateway.server, "--auth-key", f"file:{key_file}",
             "--interface", me.iface, "--hostname", "a", "--state-dir", str(me.state_dir),
             *run, "--listen-port", str(WG_PORT), "--service", "none")  # fmt: skip
    assert up["state"] == "up" and up["gateway"]["connected"], agent_log(me)
    device_id, addresses = up["device"]["id"], up["device"]["addresses"]
    key = (me.state_dir / "private.key").read_bytes()
    statuses = gateway.wait_mesh([me, peer_b], timeout=90)
    assert len(gateway.devices()) == 2

    # -- ip
    assert cli(gateway, a, "ip", *run)["addresses"] == [bare(x) for x in addresses]
    assert cli(gateway, a, "ip", "-4", *run)["addresses"] == [bare(addresses[0])]
    assert cli(gateway, a, "ip", "-6", "b", *run)["addresses"] == [
        bare(statuses["b"]["device"]["addresses"][1])
    ]

    # -- ping through the tunnel: each reply names its path; direct to b's WireGuard port
    pong = cli(gateway, a, "ping", "b", "--count", "10", *run)
    assert pong["replies"], pong
    last = pong["replies"][-1]
    assert last["path"] == "direct" and last["via"] == f"direct to {b.addr}:{WG_PORT}", pong
    assert 0 < last["rtt_ms"] < 2000
    text = a.run([*gateway.cmd, "ping", "b", "-c", "3", *run], timeout=60).stdout
    assert f"direct to {b.addr}:{WG_PORT}" in text and "ms" in text

    # -- whois: b's tunnel address, from a's map
    b_v4 = bare(statuses["b"]["device"]["addresses"][0])
    who = cli(gateway, a, "whois", b_v4, *run)
    assert who["device"]["id"] == statuses["b"]["device"]["id"] and who["kind"] == "tunnel"
    assert who["device"]["tags"] == ["tag:lab"] and who["tagged"] is True
    # its owner, as the gateway says: the enrollment key it enrolled with
    assert who["owner"]["kind"] == "enrollment-key", who
    assert who["owner"]["issuer"] == "wiregate:enrollment-key" and who["owner"]["subject"]
    missing = cli(gateway, a, "whois", "192.0.2.77", *run, check=False)
    assert missing["error"]["code"] == "not_found"

    # -- down: the interface goes, key and enrollment stay, the device stays at the gateway
    assert cli(gateway, a, "down", *run)["state"] == "down"
    assert not link_exists(a, me.iface)
    assert (me.state_dir / "private.key").read_bytes() == key
    assert (me.state_dir / "device.json").exists()
    assert cli(gateway, a, "status", *run)["state"] == "down"
    assert device_id in {d["id"] for d in gateway.devices()}
    assert not b.ping(bare(addresses[0]), timeout=1)

    # -- down is remembered: an agent restarted while down stays down
    stop(a, me)
    restarted = gateway.start_agent(a, key_file)
    assert restarted.state_dir == me.state_dir
    poll(lambda: (cli(gateway, a, "status", *run, check=False) or {}).get("state") == "down",
         timeout=30, what="the restarted agent to answer, down")  # fmt: skip
    assert not link_exists(a, me.iface)

    # -- up again: the running agent brings the same device back, no new enrollment
    again = cli(gateway, a, "up", *run)
    assert again["device"]["id"] == device_id and again["device"]["addresses"] == addresses
    assert again["device"]["public_key"] == up["device"]["public_key"]
    assert link_exists(a, me.iface) and len(gateway.devices()) == 2
    gateway.wait_mesh([me, peer_b], timeout=90)
    assert ping_until(b, bare(addresses[0]), timeout=20), agent_log(me)

    # -- logout: interface, key and state gone here; the device gone at the gateway
    out = cli(gateway, a, "logout", *run)
    assert out == {"device_id": device_id, "deleted_at_gateway": True, "note": ""}
    assert not link_exists(a, me.iface)
    left = set(p.name for p in me.state_dir.iterdir())
    assert not left & {"private.key", "private.key.next", "device.json", "netmap.json"}, left
    assert device_id not in {d["id"] for d in gateway.devices()}
    poll(lambda: not (me.run_dir / "agent.sock").exists(), timeout=15,
         what="the agent to exit after logout")  # fmt: skip
    gone = cli(gateway, a, "status", *run, check=False)
    assert gone["error"]["code"] == "unavailable"
    poll(lambda: not gateway.status(peer_b)["peers"], timeout=15, what="b to drop a")

    # -- up after logout enrolls anew (a new key); logout with the agent stopped, whose
    # tunnel stayed up (fail static), removes the interface and the device all the same
    fresh = cli(gateway, a, "up", "--auth-key", f"file:{key_file}", "--interface", me.iface,
                "--state-dir", str(me.state_dir), *run, "--service", "none")  # fmt: skip
    assert fresh["device"]["id"] != device_id
    assert fresh["device"]["public_key"] != up["device"]["public_key"]
    stop(a, me)
    assert link_exists(a, me.iface)
    offline = cli(gateway, a, "logout", "--interface", me.iface, "--state-dir",
                  str(me.state_dir), *run)  # fmt: skip
    assert offline["device_id"] == fresh["device"]["id"] and offline["deleted_at_gateway"]
    assert not link_exists(a, me.iface)
    assert not (me.state_dir / "private.key").exists()
    assert fresh["device"]["id"] not in {d["id"] for d in gateway.devices()}

"""The lab harness itself: reachability, NAT and teardown."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lab.harness import (
    OWNER_DIR,
    CommandError,
    Lab,
    LabError,
    lab_leftovers,
    lab_requirements,
    poll,
    sweep_stale,
)

pytestmark = pytest.mark.lab


def test_hosts_ping_each_other_through_the_internet(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    assert a.addr != b.addr
    assert a.ping(b.addr, count=2)
    assert b.ping(a.addr)
    assert a.ping("198.51.100.1")
    assert not a.ping("198.51.100.250", timeout=1), "an unused address must not answer"


def test_names_carry_the_run_prefix_and_fit_in_ifnamsiz(lab: Lab) -> None:
    router = lab.add_router("rtr1234", nat="eim")
    host = lab.add_host("host123", behind=router)
    assert re.fullmatch(r"wg[0-9a-f]{4}", lab.prefix)
    names = [host.ifname, host.wg_ifname, router.wan_ifname, router.lan_ifname]
    assert all(n.startswith(lab.prefix + "-") and len(n) <= 15 for n in names)
    links = host.run(["ip", "-o", "link"]).stdout
    assert host.ifname in links
    with pytest.raises(LabError):
        lab.add_host("host123")
    with pytest.raises(LabError):
        lab.add_host("toolong12")


def test_host_behind_eim_router_is_masqueraded(lab: Lab) -> None:
    server = lab.add_host("srv")
    router = lab.add_router("r1", nat="eim")
    client = lab.add_host("c1", behind=router)
    assert client.addr.startswith("192.0.2.")
    # The server logs the source of one UDP datagram; it must be the router's WAN address.
    log = lab.workdir / "udp.log"
    listener = server.spawn(
        ["python3", "-u", "-c",
         "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         "s.bind(('0.0.0.0', 40000)); print('ready', flush=True); "
         "data, src = s.recvfrom(100); print('from', src[0], src[1], data.decode(), flush=True)"],
        log=log,
    )  # fmt: skip
    poll(lambda: "ready" in listener.output(), timeout=10, what="udp listener")
    assert client.ping(server.addr, count=2)
    sender = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('0.0.0.0', 41000)); s.sendto(b'hello', ('{server.addr}', 40000))"
    )
    client.run(["python3", "-c", sender])
    line = poll(lambda: re.search(r"from (\S+) (\d+) hello", listener.output()), timeout=10,
                what="datagram at the server")  # fmt: skip
    assert line.group(1) == router.wan_addr
    assert line.group(1) != client.addr
    # The server cannot reach the LAN address directly (no route into a NAT).
    assert not server.ping(client.addr, timeout=1)


def test_symmetric_router_and_udp_block(lab: Lab) -> None:
    server = lab.add_host("srv")
    sym = lab.add_router("rs", nat="symmetric")
    blocked = lab.add_router("rb", nat="eim", block_udp=True)
    behind_sym = lab.add_host("hs", behind=sym)
    behind_block = lab.add_host("hb", behind=blocked)
    rules = sym.run(["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
    assert "--random-fully" in rules
    assert behind_sym.ping(server.addr)
    assert behind_block.ping(server.addr), "ICMP still passes the UDP-blocking firewall"
    probe = behind_block.run(
        ["python3", "-c",
         "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); "
         f"s.connect(('{server.addr}', 9)); s.send(b'x'); s.recv(10)"],
        check=False,
    )  # fmt: skip
    # UDP to a closed port gets an ICMP "port unreachable" (ConnectionRefusedError) when
    # it arrives; dropped UDP times out instead.
    assert "timed out" in probe.stderr


def test_run_reports_failures(lab: Lab) -> None:
    host = lab.add_host("a")
    with pytest.raises(CommandError) as err:
        host.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert err.value.returncode == 3
    assert "oops" in err.value.stderr
    assert host.run(["sh", "-c", "exit 3"], check=False).returncode == 3


def _resources(prefix: str) -> list[str]:
    return list(lab_leftovers(prefix))


def test_teardown_leaves_nothing_even_when_the_body_raises(tmp_path: Path) -> None:
    if reason := lab_requirements():
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), Lab(workdir=tmp_path) as lab:
        host = lab.add_host("a")
        sleeper = host.spawn(["sleep", "300"])
        wg = host.spawn(["wireguard-go", "-f", host.wg_ifname])
        poll(lambda: Path(f"/var/run/wireguard/{host.wg_ifname}.sock").exists(), timeout=10,
             what="wireguard-go socket")  # fmt: skip
        # A daemonized process inside the namespace, not in any spawned group.
        host.run(["sh", "-c", "setsid -f sleep 301 </dev/null >/dev/null 2>&1"])
        assert _resources(lab.prefix), "the lab should exist while it runs"
        raise RuntimeError("boom")
    assert _resources(lab.prefix) == []
    assert not sleeper.alive() and not wg.alive()
    assert subprocess.run(["pgrep", "-f", "sleep 301"], capture_output=True).returncode == 1
    assert not (OWNER_DIR / lab.prefix).exists()


def test_sweeper_removes_a_crashed_runs_leftovers(tmp_path: Path) -> None:
    if reason := lab_requirements():
        pytest.skip(reason)
    lab = Lab(workdir=tmp_path)
    lab.start()
    try:
        host = lab.add_host("a")
        host.spawn(["wireguard-go", "-f", host.wg_ifname])
        poll(lambda: Path(f"/var/run/wireguard/{host.wg_ifname}.sock").exists(), timeout=10,
             what="wireguard-go socket")  # fmt: skip
        # Pretend the owner died: a marker naming a process that does not exist.
        (OWNER_DIR / lab.prefix).write_text("999999999 0")
        assert lab.prefix in sweep_stale()
        assert _resources(lab.prefix) == []
    finally:
        lab.teardown()


def test_sweeper_spares_a_live_lab(lab: Lab) -> None:
    lab.add_host("a")
    assert lab.prefix not in sweep_stale()
    assert any(r.startswith("netns") for r in _resources(lab.prefix))

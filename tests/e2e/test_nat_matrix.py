"""The NAT matrix: agents behind every kind of network, each pair on the path it should take.

Hosts: two behind endpoint-independent NATs (``e1``, ``e2``), two behind
symmetric NATs (``s1``, ``s2``), one behind a firewall that drops all UDP
except to the relays (``b1``), and one open host (``o1``). Two relays (``r1``,
``r2``) admit only tickets the gateway signed. For every pair the test asserts
that the two reach each other across the tunnel and that both sides report the
expected path: direct for EIM<->EIM and EIM<->open, relayed for
symmetric<->symmetric and anything behind the UDP-blocking firewall (other
pairs must connect; their path is recorded). Then, on the same lab:

* the EIM routers' conntrack tables are flushed mid-stream: the direct pair
  recovers;
* one EIM router starts mapping to other ports: the pair finds the new mapping
  (netcheck, then a new probe) and is direct again;
* the relay carrying the relayed pairs is killed: they move to the other relay.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from lab.harness import (
    INTERNET_GATEWAY,
    Agent,
    Host,
    Lab,
    Process,
    Router,
    Wiregate,
    bare,
    poll,
)
from tests.e2e.test_mesh import ping_until
from tests.e2e.test_netcheck_mesh import drop_unsolicited, paths

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

RELAY_HOSTS = {"r1": INTERNET_GATEWAY, "r2": "198.51.100.253"}
RELAY_PORTS = {"r1": (40000, 40063), "r2": (41000, 41063)}
STUN_SECOND = "198.51.100.254"
STUN = [f"{INTERNET_GATEWAY}:3478", f"{STUN_SECOND}:3479"]
CONTROL_PORT = 3480

KINDS = {"e1": "eim", "e2": "eim", "s1": "sym", "s2": "sym", "b1": "blocked", "o1": "open"}
DIRECT = {frozenset(p) for p in (("e1", "e2"), ("e1", "o1"), ("e2", "o1"))}


def expected_path(a: str, b: str) -> str | None:
    """The path the pair must take, None where either is acceptable."""
    if frozenset((a, b)) in DIRECT:
        return "direct"
    kinds = {KINDS[a], KINDS[b]}
    if kinds == {"sym"} or "blocked" in kinds:
        return "relayed"
    return None


def start_relays(lab: Lab, wiregate: Wiregate) -> dict[str, Process]:
    """Both relays in the internet namespace, trusting the gateway's ticket signer."""
    for addr in (RELAY_HOSTS["r2"], STUN_SECOND):
        lab.internet.run(["ip", "addr", "add", f"{addr}/24", "dev", "br0"])
    signers = lab.internet.run(
        ["curl", "-sf", "-m", "5", f"{wiregate.server}/api/v1/relay/signers"], timeout=10
    ).stdout
    keys = lab.workdir / "relay-signers.json"
    keys.write_text(signers)
    relays: dict[str, Process] = {}
    for index, (rid, host) in enumerate(RELAY_HOSTS.items()):
        first, last = RELAY_PORTS[rid]
        stun = STUN if rid == "r1" else [f"{host}:3478"]
        relays[rid] = lab.internet.spawn(
            [*wiregate.cmd, "relay", *itertools.chain(*(("--stun-listen", s) for s in stun)),
             "--relay-id", rid, "--relay-listen", f"{host}:{CONTROL_PORT}",
             "--relay-ports", f"{first}-{last}", "--verify-keys-file", str(keys),
             "--metrics-listen", f"127.0.0.1:{9191 + index}", "--log-format", "json"],
            name=f"relay-{rid}",
        )  # fmt: skip
    for rid, proc in relays.items():
        poll(lambda p=proc: "relay listening" in p.output(), timeout=20, what=f"relay {rid}")
    return relays


def allow_relays_only(router: Router) -> None:
    """On a UDP-blocking router: let UDP through to (and back from) the relays only."""
    for rid, host in RELAY_HOSTS.items():
        first, last = RELAY_PORTS[rid]
        ports = f"{CONTROL_PORT},{first}:{last}"
        for match, way in (("-d", "--dports"), ("-s", "--sports")):
            router.run(["iptables", "-I", "FORWARD", "1", "-p", "udp", match, host,
                        "-m", "multiport", way, ports, "-j", "ACCEPT"])  # fmt: skip


def build_hosts(lab: Lab) -> dict[str, Host]:
    routers = {
        "e1": lab.add_router("re1", nat="eim"),
        "e2": lab.add_router("re2", nat="eim"),
        "s1": lab.add_router("rs1", nat="symmetric"),
        "s2": lab.add_router("rs2", nat="symmetric"),
        "b1": lab.add_router("rb1", nat="eim", block_udp=True),
    }
    for router in routers.values():
        drop_unsolicited(router)
    allow_relays_only(routers["b1"])
    hosts = {name: lab.add_host(name, behind=router) for name, router in routers.items()}
    hosts["o1"] = lab.add_host("o1")
    return hosts


def peer_paths(wiregate: Wiregate, agents: dict[str, Agent]) -> dict[tuple[str, str], Any]:
    """(viewer, peer) -> the viewer's path report for that peer."""
    out: dict[tuple[str, str], Any] = {}
    for name, status in wiregate.statuses(list(agents.values())).items():
        for peer in status["peers"]:
            out[(name, peer["name"])] = peer.get("path") or {}
    return out


def settled(report: dict[str, Any]) -> bool:
    return report.get("path") in ("direct", "relayed")


@pytest.fixture
def matrix(
    lab: Lab, gateway_with_relays: Wiregate, monkeypatch: pytest.MonkeyPatch
) -> tuple[Wiregate, dict[str, Host], dict[str, Agent], dict[str, Process]]:
    wiregate = gateway_with_relays
    relays = start_relays(lab, wiregate)
    hosts = build_hosts(lab)
    monkeypatch.setenv("WIREGATE_STUN_SERVERS", json.dumps(STUN))
    monkeypatch.setenv("WIREGATE_PATH_PROBE_TIMEOUT", "3")
    monkeypatch.setenv("WIREGATE_RELAY_PING_INTERVAL", "1")
    monkeypatch.setenv("WIREGATE_NETCHECK_INTERVAL", "15")
    key = wiregate.create_key()
    agents = {name: wiregate.start_agent(host, key) for name, host in hosts.items()}
    wiregate.wait_mesh(list(agents.values()), timeout=120)
    return wiregate, hosts, agents, relays


@pytest.fixture
def gateway_with_relays(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Wiregate:
    relays = [f"{rid}={host}:{CONTROL_PORT}" for rid, host in RELAY_HOSTS.items()]
    monkeypatch.setenv("WIREGATE_RELAYS", json.dumps(relays))
    monkeypatch.setenv("WIREGATE_RELAY_PROBE_INTERVAL", "1")
    wiregate = Wiregate(lab)
    wiregate.start_gateway()
    monkeypatch.delenv("WIREGATE_RELAYS")
    monkeypatch.delenv("WIREGATE_RELAY_PROBE_INTERVAL")
    return wiregate


def wrong_paths(reports: dict[tuple[str, str], Any]) -> list[str]:
    """Every (viewer, peer) whose path is not settled or not the expected one."""
    wrong = []
    for (viewer, peer), report in sorted(reports.items()):
        want = expected_path(viewer, peer)
        if not settled(report) or (want is not None and report["path"] != want):
            wrong.append(f"{viewer}->{peer}: {report.get('path')} ({report.get('reason')})")
    return wrong


def wait_paths(
    wiregate: Wiregate, agents: dict[str, Agent], timeout: float
) -> dict[tuple[str, str], Any]:
    """Wait until every pair is on its expected path; fail with the pairs that are not."""
    deadline = time.monotonic() + timeout
    while True:
        reports = peer_paths(wiregate, agents)
        wrong = wrong_paths(reports)
        if reports and not wrong:
            return reports
        if time.monotonic() > deadline:
            pytest.fail("pairs not on their expected path:\n" + "\n".join(wrong))
        time.sleep(1.0)


def unreachable(
    wiregate: Wiregate, hosts: dict[str, Host], agents: dict[str, Agent], timeout: float = 20
) -> list[str]:
    addresses = {n: bare(wiregate.status(a)["device"]["addresses"][0]) for n, a in agents.items()}
    return [
        f"{a}->{b}"
        for a, b in itertools.permutations(hosts, 2)
        if not ping_until(hosts[a], addresses[b], timeout=timeout)
    ]


def test_nat_matrix_paths_conntrack_flush_and_relay_failover(
    lab: Lab,
    matrix: tuple[Wiregate, dict[str, Host], dict[str, Agent], dict[str, Process]],
) -> None:
    wiregate, hosts, agents, relays = matrix
    started = time.monotonic()
    reports = wait_paths(wiregate, agents, timeout=150)
    print(f"every pair on its expected path after {time.monotonic() - started:.1f} s")
    failed = unreachable(wiregate, hosts, agents)
    assert not failed, f"unreachable: {failed}\n{paths(list(lab.routers.values()), [])}"
    table = {f"{v}->{p}": f"{r['path']}: {r['reason']}" for (v, p), r in reports.items()}
    print(json.dumps(table, indent=1))  # the matrix, for the record

    # -- conntrack flushed on both EIM routers while e1 talks to e2: the pair recovers
    addr_e2 = bare(wiregate.status(agents["e2"])["device"]["addresses"][0])
    for name in ("re1", "re2"):
        lab.routers[name].run(["conntrack", "-F"], check=False)
    started = time.monotonic()
    assert ping_until(hosts["e1"], addr_e2, timeout=60), "e1<->e2 did not recover"
    recovery = time.monotonic() - started
    print(f"direct pair recovered {recovery:.1f} s after the conntrack flush")

    # -- e1's NAT maps it to another port (the router restarts with a new port range):
    # e2 learns e1's new reflexive endpoint from netcheck and the pair goes direct again
    router = lab.routers["re1"]
    router.run(["iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-o", router.wan_ifname,
                "-p", "udp", "-j", "MASQUERADE", "--to-ports", "20000-20999"])  # fmt: skip
    router.run(["conntrack", "-F"], check=False)
    started = time.monotonic()

    def direct_again() -> bool:
        live = {p["name"]: p for p in wiregate.status(agents["e2"])["peers"]}
        endpoint = live["e1"]["endpoint"] or ""
        port = int(endpoint.rpartition(":")[2] or 0)
        return live["e1"]["path"]["path"] == "direct" and 20000 <= port <= 20999

    poll(direct_again, timeout=90, interval=0.5, what="e2 to reach e1 directly at its new mapping")
    assert ping_until(hosts["e2"], _addr(wiregate, agents["e1"]), timeout=20)
    print(f"direct pair back on the new NAT mapping {time.monotonic() - started:.1f} s later")

    # -- the relay carrying s1<->s2 dies: relayed pairs move to the other relay
    relayed = {k: r for k, r in peer_paths(wiregate, agents).items() if r["path"] == "relayed"}
    victim = relayed[("s1", "s2")]["relay"]
    assert victim in relays, relayed
    survivor = next(r for r in relays if r != victim)
    relays[victim].stop()
    killed = time.monotonic()

    def moved() -> bool:
        now = peer_paths(wiregate, agents)
        return all(now[k].get("relay") == survivor for k in relayed)

    poll(moved, timeout=60, interval=0.5, what=f"relayed pairs to move to {survivor}")
    moved_after = time.monotonic() - killed
    failed = [
        f"{a}->{b}" for a, b in relayed if not ping_until(hosts[a], _addr(wiregate, agents[b]), 20)
    ]
    assert not failed, f"unreachable after the relay died: {failed}"
    print(f"relayed pairs moved to {survivor} {moved_after:.1f} s after {victim} died")


def _addr(wiregate: Wiregate, agent: Agent) -> str:
    return bare(wiregate.status(agent)["device"]["addresses"][0])

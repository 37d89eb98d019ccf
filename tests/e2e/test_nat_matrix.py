"""The NAT matrix: agents behind every kind of network, each pair on the path it should take.

Hosts: two behind endpoint-independent NATs that filter by address and port, as
Linux conntrack does (``e1``, ``e2``), one behind an endpoint-independent NAT that
filters by address only (``a1``), two behind symmetric NATs (``s1``, ``s2``), one
behind a firewall that drops all UDP except to the relays (``b1``), one behind a
firewall that drops all UDP and lets only TCP to the relays' 443 and to the gateway
out (``t1``), and one open host (``o1``). Two relays (``r1``, ``r2``) admit only
tickets the gateway signed, over UDP and over TLS on 443 (a lab CA every agent
trusts). For every pair the test asserts that the two reach each other across the
tunnel and that both sides report the pair's best path, and why
(:func:`lab.nat.best_path`):

* anything behind the UDP-blocking firewall: relayed, "UDP blocked" on this
  network or on the peer's;
* the TCP-only host: relayed over TCP 443 to every peer ("UDP blocked on this
  network: relayed over TCP 443 via relay ..."); its peers relayed over UDP, "UDP
  blocked on the peer's network"; no other host's binding is carried over TCP;
* open <-> anything else: direct, "open host" on both sides;
* EIM <-> EIM: direct;
* address-filtering EIM <-> symmetric: direct by port prediction;
* port-filtering EIM <-> symmetric: relayed, the symmetric NAT named on both sides
  (a prediction hitting the random port is allowed, and must say so);
* symmetric <-> symmetric: relayed.

Then, on the same lab:

* the EIM routers' conntrack tables are flushed mid-stream: the direct pair
  recovers;
* one EIM router starts mapping to other ports: the pair finds the new mapping
  (netcheck, then a new probe) and is direct again;
* the relay carrying the relayed pairs is killed: they move to the other relay
  (the TCP-only host's too, over TCP).

The matrix is then started from cold twice more, each time asserting every pair's
path and reachability again: three cold starts in a row per run.

The TCP-only host leaving TCP once its router passes UDP again is
tests/e2e/test_tcp_fallback.py.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from lab.harness import (
    Agent,
    Host,
    Lab,
    Process,
    Wiregate,
    bare,
    poll,
)
from lab.nat import (
    MATRIX_AGENT_ENV,
    build_matrix,
    path_problem,
    paths,
    peer_reports,
    start_matrix_relays,
)
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]


def settled(report: dict[str, Any]) -> bool:
    return report.get("path") in ("direct", "relayed")


@pytest.fixture
def matrix(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> tuple[Wiregate, dict[str, Host], dict[str, Agent], dict[str, Process]]:
    wiregate, ca_file, relays = start_matrix_relays(lab)
    wiregate.status_timeout = 60.0  # eight agents and their CLIs on a shared 2-core machine
    hosts = build_matrix(lab)
    for name, value in MATRIX_AGENT_ENV.items():
        monkeypatch.setenv(name, value)
    key = wiregate.create_key()
    agents = {
        name: wiregate.start_agent(host, key, ca_file=ca_file) for name, host in hosts.items()
    }
    wiregate.wait_mesh(list(agents.values()), timeout=120)
    return wiregate, hosts, agents, relays


def wrong_paths(reports: dict[tuple[str, str], Any]) -> list[str]:
    """Every (viewer, peer) whose path is not settled or not the pair's best one."""
    wrong = []
    for (viewer, peer), report in sorted(reports.items()):
        problem = path_problem(viewer, peer, report) if settled(report) else "unsettled"
        if problem is not None:
            wrong.append(problem if settled(report) else f"{viewer}->{peer}: {report}")
    return wrong


def wait_paths(
    wiregate: Wiregate, agents: dict[str, Agent], timeout: float
) -> dict[tuple[str, str], Any]:
    """Wait until every pair is on its expected path; fail with the pairs that are not."""
    deadline = time.monotonic() + timeout
    while True:
        reports = peer_reports(wiregate, agents)
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
    relayed = {k: r for k, r in peer_reports(wiregate, agents).items() if r["path"] == "relayed"}
    victim = relayed[("s1", "s2")]["relay"]
    assert victim in relays, relayed
    survivor = next(r for r in relays if r != victim)
    relays[victim].stop()
    killed = time.monotonic()

    def moved() -> bool:  # to the other relay, or to direct where a retry found a way
        now = peer_reports(wiregate, agents)
        return all(now[k].get("relay") == survivor or now[k]["path"] == "direct" for k in relayed)

    poll(moved, timeout=60, interval=0.5, what=f"relayed pairs to leave {victim}")
    moved_after = time.monotonic() - killed
    failed = [
        f"{a}->{b}" for a, b in relayed if not ping_until(hosts[a], _addr(wiregate, agents[b]), 20)
    ]
    now = peer_reports(wiregate, agents)
    sides = {f"{a}->{b}": now[(a, b)] for a, b in relayed if f"{a}->{b}" in failed}
    assert not failed, f"unreachable after the relay died: {failed}: {sides}"
    print(f"relayed pairs moved to {survivor} {moved_after:.1f} s after {victim} died")


@pytest.mark.parametrize("start", [2, 3])
def test_nat_matrix_from_cold_again(
    start: int,
    lab: Lab,
    matrix: tuple[Wiregate, dict[str, Host], dict[str, Agent], dict[str, Process]],
) -> None:
    """The matrix started from cold twice more (timing defects show only sometimes):
    each time every pair ends on its best path, with the right reason, and reaches its
    peer across the tunnel."""
    wiregate, hosts, agents, _relays = matrix
    started = time.monotonic()
    wait_paths(wiregate, agents, timeout=150)
    took = time.monotonic() - started
    print(f"start {start}: every pair on its expected path after {took:.1f} s")
    failed = unreachable(wiregate, hosts, agents)
    assert not failed, f"unreachable: {failed}\n{paths(list(lab.routers.values()), [])}"


def _addr(wiregate: Wiregate, agent: Agent) -> str:
    return bare(wiregate.status(agent)["device"]["addresses"][0])

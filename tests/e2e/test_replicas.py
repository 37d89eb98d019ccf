"""Gateway replicas in the lab: two ``wiregate gateway`` processes on one real PostgreSQL
(Debian's, started inside the lab's internet namespace), real agents on wireguard-go.

* a change made through one replica reaches agents streaming from the other;
* ``kill -9`` of the replica agents stream from: they resume on the other within
  seconds and the tunnels between them lose no packet;
* PostgreSQL restarted under the replicas: they recover by themselves (a new
  enrollment works and reaches every agent), tunnels carry on throughout;
* SIGTERM drains a replica: its agents are told to go (1012) and move at once.

Figures are printed (``-s``).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_faults import start_ping, stop_ping
from tests.lab.harness import (
    INTERNET_GATEWAY,
    Agent,
    Lab,
    LabError,
    Process,
    Wiregate,
    poll,
)
from tests.pg import PgServer

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

PORTS = (8080, 8081)
FAILOVER_BUDGET_S = 3.0  # the p99 target for an agent to resume elsewhere


@dataclass
class Replicas:
    """Two gateway processes on one database, reached by agents as ``A,B``."""

    lab: Lab
    pg: PgServer
    url: str
    wiregate: Wiregate
    procs: dict[int, Process]

    def server(self, port: int) -> str:
        return f"http://{INTERNET_GATEWAY}:{port}"

    def start(self, port: int) -> Process:
        root = self.lab.workdir / f"gateway-{port}"
        root.mkdir(parents=True, exist_ok=True)
        proc = self.lab.internet.spawn(
            [*self.wiregate.cmd, "gateway", "--listen", f"{INTERNET_GATEWAY}:{port}",
             "--metrics-listen", f"{INTERNET_GATEWAY}:{port + 1000}",
             "--state-dir", str(root), "--admin-socket", str(self.socket(port)),
             "--database-url", self.url],
            name=f"gateway-{port}",
        )  # fmt: skip
        self.procs[port] = proc
        poll(lambda: self.ready(port), timeout=60, what=f"replica {port} /readyz")
        return proc

    def socket(self, port: int) -> Path:
        return self.lab.workdir / f"gateway-{port}" / "gw.sock"

    def ready(self, port: int) -> bool:
        proc = self.procs[port]
        if not proc.alive():
            raise LabError(f"replica {port} exited {proc.returncode}:\n{proc.output(3000)}")
        probe = self.lab.internet.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
             f"{self.server(port)}/readyz"], check=False, timeout=10,
        )  # fmt: skip
        return probe.stdout.strip() == "200"

    def use(self, port: int) -> None:
        """Admin commands and new agents go to replica ``port`` first."""
        self.wiregate.admin_socket = self.socket(port)
        other = PORTS[1 - PORTS.index(port)]
        self.wiregate.server = f"{self.server(port)},{self.server(other)}"


@pytest.fixture
def replicas(lab: Lab) -> Iterator[Replicas]:
    pg = PgServer(host=INTERNET_GATEWAY, wrap=lab.internet._wrap).start()
    try:
        url = pg.create_database()
        wiregate = Wiregate(lab)
        reps = Replicas(lab, pg, url, wiregate, {})
        for port in PORTS:
            reps.start(port)
        yield reps
        for proc in reps.procs.values():  # before their database goes
            proc.stop()
    finally:
        pg.destroy()


def logged_at(proc: Process, event: str, after: float, **fields: Any) -> float | None:
    """Wall-clock time of the first JSON log line of ``proc`` with ``event`` and ``fields``
    at or after ``after`` (the process's own timestamps: no polling delay in figures)."""
    for line in proc.output().splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") != event or any(doc.get(k) != v for k, v in fields.items()):
            continue
        at = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
        if at >= after:
            return at
    return None


def resumed_on(reps: Replicas, port: int, device_ids: dict[str, str], since: float
               ) -> dict[str, float]:  # fmt: skip
    """Seconds from ``since`` until each device's stream opened on replica ``port``."""
    found: dict[str, float] = {}

    def all_opened() -> bool:
        for name, device_id in device_ids.items():
            at = logged_at(reps.procs[port], "stream_open", since, device_id=device_id)
            if at is not None:
                found[name] = at - since
        return len(found) == len(device_ids)

    poll(all_opened, timeout=20, interval=0.1, what=f"streams to resume on replica {port}")
    return found


def wg_peers(agent: Agent) -> set[str]:
    return set(agent.host.run(["wg", "show", agent.iface, "peers"]).stdout.split())


def connected_to(wiregate: Wiregate, agent: Agent) -> str | None:
    gateway: dict[str, Any] = wiregate.status(agent)["gateway"]
    return str(gateway["server"]) if gateway["connected"] else None


def mesh_of(reps: Replicas, names: list[str], first: list[int]) -> dict[str, Agent]:
    reps.use(first[0])
    key_file = reps.wiregate.create_key(tags="tag:lab", expiry="1h", reusable=True)
    agents = {}
    for name, port in zip(names, first, strict=True):
        reps.use(port)
        agents[name] = reps.wiregate.start_agent(reps.lab.add_host(name), key_file)
    reps.wiregate.wait_mesh(list(agents.values()), timeout=90)
    return agents


def test_a_change_through_one_replica_reaches_agents_on_the_other(replicas: Replicas) -> None:
    agents = mesh_of(replicas, ["a", "b"], [8080, 8081])
    wg = replicas.wiregate
    assert connected_to(wg, agents["a"]) == replicas.server(8080)
    assert connected_to(wg, agents["b"]) == replicas.server(8081)
    # enrolled through 8081: a, streaming from 8080, gets it as a peer
    replicas.use(8081)
    key_file = wg.create_key(tags="tag:lab", expiry="1h", reusable=True)
    agents["c"] = wg.start_agent(replicas.lab.add_host("c"), key_file)
    wg.wait_mesh(list(agents.values()), timeout=60)
    assert connected_to(wg, agents["c"]) == replicas.server(8081)
    # removed through 8080: b and c, streaming from 8081, drop it within moments
    replicas.use(8080)
    device_c = wg.status(agents["c"])["device"]
    started = time.time()
    wg.admin("devices", "remove", device_c["id"])
    poll(
        lambda: all(device_c["public_key"] not in wg_peers(agents[n]) for n in ("a", "b")),
        timeout=10, interval=0.1, what="a and b to drop c from their WireGuard peers",
    )  # fmt: skip
    applied = {
        n: logged_at(agents[n].proc, "map applied", started, peers=1) for n in ("a", "b")
    }  # fmt: skip
    deleted = logged_at(replicas.procs[8080], "device_deleted", started, device_id=device_c["id"])
    assert deleted is not None
    took = {n: at - deleted for n, at in applied.items() if at is not None}
    print(f"\nremoval committed on replica 8080, applied by a (on 8080) after {took['a']:.3f} s, "
          f"by b (on 8081) after {took['b']:.3f} s")  # fmt: skip
    assert max(took.values()) < 1.0


def test_replica_killed_agents_move_and_tunnels_lose_nothing(replicas: Replicas) -> None:
    agents = mesh_of(replicas, ["a", "b", "c"], [8080, 8080, 8081])
    wg = replicas.wiregate
    b_addr = wg.tunnel_addresses(agents["b"])[0]
    ping = start_ping(agents["a"].host, b_addr)
    ids = {name: wg.status(agents[name])["device"]["id"] for name in ("a", "b")}
    time.sleep(2)
    killed_at = time.time()
    replicas.procs[8080].signal(signal.SIGKILL)
    moved = resumed_on(replicas, 8081, ids, killed_at)
    # the surviving replica serves changes to everyone: a fourth agent joins through it
    replicas.use(8081)
    key_file = wg.create_key(tags="tag:lab", expiry="1h", reusable=True)
    agents["d"] = wg.start_agent(replicas.lab.add_host("d"), key_file)
    wg.wait_mesh(list(agents.values()), timeout=60)
    result = stop_ping(ping)
    print(f"\nreplica killed: agents resumed on the other after "
          f"{', '.join(f'{n} {t:.2f} s' for n, t in sorted(moved.items()))}; "
          f"ping a->b {result.transmitted} sent, lost {len(result.lost)}")  # fmt: skip
    assert max(moved.values()) < FAILOVER_BUDGET_S
    assert result.lost == ()


def test_postgresql_restarted_gateways_recover_by_themselves(replicas: Replicas) -> None:
    agents = mesh_of(replicas, ["a", "b"], [8080, 8081])
    wg = replicas.wiregate
    ping = start_ping(agents["a"].host, wg.tunnel_addresses(agents["b"])[0])
    replicas.pg.stop("fast")
    down_at = time.monotonic()
    poll(lambda: not replicas.ready(8080), timeout=15, what="/readyz to report the store down")
    refused = wg.admin("keys", "create", "--tags", "tag:lab", "--json", check=False)
    assert refused.returncode != 0
    assert "database is unavailable" in refused.stderr + refused.stdout
    time.sleep(3)
    replicas.pg.start()
    poll(lambda: replicas.ready(8080) and replicas.ready(8081), timeout=30, what="recovery")
    recovered = time.monotonic() - down_at
    replicas.use(8080)
    key_file = wg.create_key(tags="tag:lab", expiry="1h", reusable=True)
    replicas.use(8081)  # the new agent streams from the other replica
    agents["c"] = wg.start_agent(replicas.lab.add_host("c"), key_file)
    wg.wait_mesh(list(agents.values()), timeout=60)
    result = stop_ping(ping)
    print(f"\nPostgreSQL down ~3 s: both replicas ready again {recovered:.1f} s after the stop; "
          f"ping a->b {result.transmitted} sent, lost {len(result.lost)}")  # fmt: skip
    assert result.lost == ()


def test_sigterm_drains_a_replica_and_its_agents_move_at_once(replicas: Replicas) -> None:
    agents = mesh_of(replicas, ["a", "b"], [8080, 8081])
    wg = replicas.wiregate
    device_a = wg.status(agents["a"])["device"]["id"]
    started = time.time()
    replicas.procs[8080].signal(signal.SIGTERM)
    moved = resumed_on(replicas, 8081, {"a": device_a}, started)["a"]
    code = replicas.procs[8080].wait(timeout=20)
    assert code == 0, replicas.procs[8080].output(2000)
    assert connected_to(wg, agents["a"]) == replicas.server(8081)
    print(f"\nSIGTERM: the drained replica's agent resumed on the other after {moved:.2f} s")
    assert moved < FAILOVER_BUDGET_S

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

import signal
import time
from collections.abc import Iterator

import pytest

from lab.harness import Agent, Lab, poll
from lab.ping import start_ping, stop_ping
from lab.replicas import Replicas, connected_to, logged_at, replicas_on, resumed_on

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

FAILOVER_BUDGET_S = 3.0  # the p99 target for an agent to resume elsewhere


@pytest.fixture
def replicas(lab: Lab) -> Iterator[Replicas]:
    with replicas_on(lab) as reps:
        yield reps


def wg_peers(agent: Agent) -> set[str]:
    return set(agent.host.run(["wg", "show", agent.iface, "peers"]).stdout.split())


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

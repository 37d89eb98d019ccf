"""Replica failover: ``python -m benchmarks.failover`` prints one JSON object of figures.

In a lab (network namespaces, real wireguard-go agents; :mod:`tests.lab.harness`), a
real PostgreSQL and two ``wiregate gateway`` replicas (:mod:`tests.lab.replicas`).
Four agents enroll, all streaming from replica 8080 first (``--server A,B``); two
continuous pings (a → b, c → d, every 20 ms) run across their tunnels for the whole
benchmark. Each round SIGKILLs the replica the four agents stream from, times per
agent the wall clock from the kill until the surviving replica logged that agent's
``stream_open`` (the replica's own timestamp: no polling delay), then restarts the
killed replica; the next round kills the other one, so agents go back and forth.

Figures over all (agent, round) samples: ``failover_p99_s`` (nearest rank; target
< 3 s), ``failover_p50_s``, ``failover_max_s``, ``failover_samples``, ``failover_rounds``;
``failover_lost_packets`` (pings without a reply over the whole run, the in-flight
tail at the end excluded; target 0) out of ``failover_pings``; ``failover_mesh_ok`` = 1
once every agent, after the last round, is connected with the full mesh as peers.
Without root or wireguard-go (or PostgreSQL) it prints ``{"skipped": REASON}``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time

from benchmarks.common import emit
from benchmarks.fanout import percentile
from tests.e2e.test_faults import PingResult, start_ping, stop_ping
from tests.lab.harness import Agent, Lab, lab_requirements
from tests.lab.replicas import PORTS, Replicas, connected_to, replicas_on, resumed_on
from tests.pg import pg_bin

__all__ = ["run"]

ROUNDS = 10
AGENTS = ("a", "b", "c", "d")
PAIRS = (("a", "b"), ("c", "d"))  # continuous pings across these tunnels
PING_INTERVAL_S = 0.02
SETTLE_S = 2.0  # between a replica's restart and the next kill
RESUME_TIMEOUT_S = 60.0  # above the agent's longest reconnect back-off (30 s x 1.5)


def requirements() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if reason := lab_requirements():
        return reason
    try:
        pg_bin()
    except RuntimeError as exc:
        return str(exc)
    return None


def start_agents(reps: Replicas, first: int) -> dict[str, Agent]:
    """Enroll the agents, all preferring replica ``first``; wait for the full mesh."""
    reps.use(first)
    key_file = reps.wiregate.create_key(tags="tag:bench", expiry="1h", reusable=True)
    agents = {name: reps.wiregate.start_agent(reps.lab.add_host(name), key_file) for name in AGENTS}
    reps.wiregate.wait_mesh(list(agents.values()), timeout=90)
    return agents


def check_on(reps: Replicas, agents: dict[str, Agent], port: int) -> None:
    """Every agent streams from replica ``port`` (else a round would not measure it)."""
    wanted = reps.server(port)
    where = {name: connected_to(reps.wiregate, agent) for name, agent in agents.items()}
    if any(url != wanted for url in where.values()):
        raise RuntimeError(f"agents should all stream from {wanted}: {where}")


def kill_round(reps: Replicas, ids: dict[str, str], victim: int) -> dict[str, float]:
    """SIGKILL replica ``victim``; seconds until each agent resumed on the other;
    restart the victim."""
    survivor = PORTS[1 - PORTS.index(victim)]
    killed_at = time.time()
    reps.procs[victim].signal(signal.SIGKILL)
    moved = resumed_on(reps, survivor, ids, killed_at, timeout=RESUME_TIMEOUT_S)
    reps.procs[victim].wait(timeout=10)
    started = time.monotonic()
    reps.start(victim)
    print(f"replica {victim} ready again {time.monotonic() - started:.1f} s after its restart",
          file=sys.stderr, flush=True)  # fmt: skip
    return moved


def measure(lab: Lab, rounds: int) -> tuple[list[float], list[PingResult]]:
    """The failover samples of ``rounds`` rounds and the pings' results."""
    started = time.monotonic()
    with replicas_on(lab) as reps:
        agents = start_agents(reps, PORTS[0])
        print(f"replicas and a mesh of {len(agents)} agents up after "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        wg = reps.wiregate
        ids = {name: str(wg.status(agent)["device"]["id"]) for name, agent in agents.items()}
        pings = [
            start_ping(agents[a].host, wg.tunnel_addresses(agents[b])[0], PING_INTERVAL_S)
            for a, b in PAIRS
        ]
        samples: list[float] = []
        victim = PORTS[0]
        for index in range(rounds):
            check_on(reps, agents, victim)
            time.sleep(SETTLE_S)
            moved = kill_round(reps, ids, victim)
            samples.extend(moved.values())
            print(f"round {index + 1}: killed {victim}, resumed after "
                  + ", ".join(f"{n} {t:.3f} s" for n, t in sorted(moved.items())),
                  file=sys.stderr, flush=True)  # fmt: skip
            victim = PORTS[1 - PORTS.index(victim)]
        wg.wait_mesh(list(agents.values()), timeout=60)
        check_on(reps, agents, victim)
        return samples, [stop_ping(ping) for ping in pings]


def run(rounds: int = ROUNDS) -> dict[str, float]:
    """Build the lab, run ``rounds`` kill rounds, tear down; return the figures."""
    with Lab() as lab:
        try:
            samples, pings = measure(lab, rounds)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise
    for (a, b), result in zip(PAIRS, pings, strict=True):
        print(f"ping {a}->{b}: {result.transmitted} sent, lost {list(result.lost)}",
              file=sys.stderr)  # fmt: skip
    return {
        "failover_p99_s": round(percentile(samples, 99), 3),
        "failover_p50_s": round(statistics.median(samples), 3),
        "failover_max_s": round(max(samples), 3),
        "failover_samples": len(samples),
        "failover_rounds": rounds,
        "failover_lost_packets": sum(len(r.lost) for r in pings),
        "failover_pings": sum(r.transmitted for r in pings),
        "failover_mesh_ok": 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="replica failover time and packet loss")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    if reason := requirements():
        print(json.dumps({"skipped": reason}))
    else:
        emit(run(args.rounds))


if __name__ == "__main__":
    main()

"""Replica failover: ``python -m benchmarks.failover`` prints one JSON object of figures.

In a lab (network namespaces, real wireguard-go agents; :mod:`lab.harness`), a
real PostgreSQL and two ``wiregate gateway`` replicas (:mod:`lab.replicas`).
Four agents enroll, all streaming from replica 8080 first (``--server A,B``); two
continuous pings (a → b, c → d, every 20 ms) run across their tunnels for the whole
benchmark. Each round SIGKILLs the replica the four agents stream from, times per
agent the wall clock from the kill until the surviving replica logged that agent's
``stream_open`` (the replica's own timestamp: no polling delay), then restarts the
killed replica; the next round kills the other one, so agents go back and forth.

Before each kill, no agent may have logged a lost stream since it resumed (they all
stream from the replica about to be killed); after the last round every agent must
stream from the last survivor with the full mesh as peers, else the benchmark fails.

Figures over all (agent, round) samples: ``failover_p99_s`` (nearest rank; target
< 3 s), ``failover_p50_s``, ``failover_max_s``, ``failover_samples``, ``failover_rounds``,
and ``failover_first_round_max_s`` (the worst agent of the first kill alone);
``failover_lost_packets`` (pings without a reply over the whole run, the in-flight
tail at the end excluded; target 0) out of ``failover_pings``; ``failover_mesh_ok`` = 1
(the final mesh check passed).
Without root or wireguard-go (or PostgreSQL) it prints ``{"skipped": REASON}``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from typing import Any

from benchmarks.common import emit
from benchmarks.fanout import percentile
from lab.harness import Agent, Lab, Wiregate, bare, lab_requirements, poll
from lab.pg import pg_bin
from lab.ping import PingResult, start_ping, stop_ping
from lab.replicas import PORTS, Replicas, logged_at, replicas_on, resumed_on

__all__ = ["run"]

ROUNDS = 10
AGENTS = ("a", "b", "c", "d")
PAIRS = (("a", "b"), ("c", "d"))  # continuous pings across these tunnels
PING_INTERVAL_S = 0.02
SETTLE_S = 2.0  # between a replica's restart and the next kill
RESUME_TIMEOUT_S = 60.0  # above the agent's longest reconnect back-off (30 s x 1.5)
MESH_TIMEOUT_S = 180.0
STREAM_LOST = "gateway unreachable; data plane kept as is"  # the agent's log event


def requirements() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if reason := lab_requirements():
        return reason
    try:
        pg_bin()
    except RuntimeError as exc:
        return str(exc)
    return None


Status = dict[str, dict[str, Any]]


def mesh_on(wg: Wiregate, agents: dict[str, Agent], server: str) -> Status | None:
    """Every agent's status when all stream from ``server`` with every other agent as a
    peer, else None. One ``wiregate status`` at a time: on a loaded 2-core machine four
    at once can each exceed the harness's 20 s (as :meth:`Wiregate.wait_mesh` does)."""
    docs = {name: wg.status(agent) for name, agent in agents.items()}
    ids = {name: doc["device"].get("id") for name, doc in docs.items()}
    for name, doc in docs.items():
        peers = {p["id"] for p in doc["peers"]}
        if not doc["gateway"]["connected"] or doc["gateway"]["server"] != server:
            return None
        if peers != {i for n, i in ids.items() if n != name}:
            return None
    return docs


def start_agents(reps: Replicas, first: int) -> tuple[dict[str, Agent], Status]:
    """Enroll the agents, all preferring replica ``first``; wait for the full mesh."""
    reps.use(first)
    key_file = reps.wiregate.create_key(tags="tag:bench", expiry="1h", reusable=True)
    agents = {name: reps.wiregate.start_agent(reps.lab.add_host(name), key_file) for name in AGENTS}
    docs = poll(lambda: mesh_on(reps.wiregate, agents, reps.server(first)),
                timeout=MESH_TIMEOUT_S, interval=1.0, what="the agents' full mesh")  # fmt: skip
    return agents, docs


def stayed(agents: dict[str, Agent], since: dict[str, float]) -> None:
    """No agent's stream failed since it resumed (so all stream from the same replica)."""
    for name, agent in agents.items():
        assert agent.proc is not None
        if (at := logged_at(agent.proc, STREAM_LOST, since[name])) is not None:
            raise RuntimeError(f"agent {name} lost its stream again at {at:.3f}")


def kill_round(reps: Replicas, ids: dict[str, str], victim: int) -> tuple[float, dict[str, float]]:
    """SIGKILL replica ``victim``; the kill's wall-clock time and the seconds until each
    agent resumed on the other; restart the victim."""
    survivor = PORTS[1 - PORTS.index(victim)]
    killed_at = time.time()
    reps.procs[victim].signal(signal.SIGKILL)
    moved = resumed_on(reps, survivor, ids, killed_at, timeout=RESUME_TIMEOUT_S)
    reps.procs[victim].wait(timeout=10)
    started = time.monotonic()
    reps.start(victim)
    print(f"replica {victim} ready again {time.monotonic() - started:.1f} s after its restart",
          file=sys.stderr, flush=True)  # fmt: skip
    return killed_at, moved


def measure(lab: Lab, rounds: int) -> tuple[list[list[float]], list[PingResult]]:
    """Per round, the agents' failover times; the pings' results."""
    started = time.monotonic()
    with replicas_on(lab) as reps:
        agents, docs = start_agents(reps, PORTS[0])
        print(f"replicas and a mesh of {len(agents)} agents up after "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        wg = reps.wiregate
        ids = {name: str(doc["device"]["id"]) for name, doc in docs.items()}
        pings = [
            start_ping(agents[a].host, bare(docs[b]["device"]["addresses"][0]), PING_INTERVAL_S)
            for a, b in PAIRS
        ]
        samples: list[list[float]] = []
        resumed = dict.fromkeys(agents, time.time())
        victim = PORTS[0]
        for index in range(rounds):
            time.sleep(SETTLE_S)
            stayed(agents, resumed)
            killed_at, moved = kill_round(reps, ids, victim)
            samples.append(list(moved.values()))
            resumed = {name: killed_at + took for name, took in moved.items()}
            print(f"round {index + 1}: killed {victim}, resumed after "
                  + ", ".join(f"{n} {t:.3f} s" for n, t in sorted(moved.items())),
                  file=sys.stderr, flush=True)  # fmt: skip
            victim = PORTS[1 - PORTS.index(victim)]
        last = reps.server(victim)
        poll(lambda: mesh_on(wg, agents, last), timeout=MESH_TIMEOUT_S, interval=1.0,
             what="the full mesh after the last round")  # fmt: skip
        return samples, [stop_ping(ping) for ping in pings]


def run(rounds: int = ROUNDS) -> dict[str, float]:
    """Build the lab, run ``rounds`` kill rounds, tear down; return the figures."""
    with Lab() as lab:
        try:
            per_round, pings = measure(lab, rounds)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise
    samples = [took for round_ in per_round for took in round_]
    for (a, b), result in zip(PAIRS, pings, strict=True):
        print(f"ping {a}->{b}: {result.transmitted} sent, lost {list(result.lost)}",
              file=sys.stderr)  # fmt: skip
    return {
        "failover_p99_s": round(percentile(samples, 99), 3),
        "failover_p50_s": round(statistics.median(samples), 3),
        "failover_max_s": round(max(samples), 3),
        "failover_first_round_max_s": round(max(per_round[0]), 3),
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

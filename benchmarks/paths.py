"""Direct-path rate of the NAT matrix: ``python -m benchmarks.paths`` prints one JSON object.

The lab's NAT matrix (:func:`lab.nat.build_matrix`: hosts behind port-filtering and
address-filtering endpoint-independent NATs, symmetric NATs, a UDP-blocking firewall,
a TCP-only firewall, and an open host; two relays, over UDP and TLS on 443; real
wireguard-go agents) is built and started from cold
``--rounds`` times (fresh namespaces, gateway, relays and agents each time). Each
round waits until every pair reports its best path (:func:`lab.nat.best_path`) or
``--timeout`` passes, then reads every agent's status and log.

Figures over all rounds:

* ``direct_pair_rate``: pairs that end direct on both sides ÷ pairs whose best path
  is direct in this topology (target 1.0; no pair with a UDP-blocked or TCP-only
  host counts: those are relayed at best);
* ``time_to_direct_p99_s`` / ``_p50_s`` (nearest rank) over the pairs that need no
  port prediction (target < 5 s), and ``time_to_direct_predicted_p99_s`` over the
  address-filtering <-> symmetric pairs, direct by port prediction (target < 15 s).
  A pair's time runs from the later of the moments its two agents first learnt of
  each other (their first ``path`` log line for the peer) to the later of the
  moments both sides went direct (the ``since`` of their status);
* ``prediction_probes``: probe packets one port prediction sends (the largest burst
  logged), ``prediction_bursts``: bursts per round (mean);
* ``paths_rounds``, ``paths_settle_max_s`` (the slowest round to reach every best path),
  ``paths_unsettled_pairs`` (directed pairs still off their best path when a round's
  settle timeout ended, each printed with its problem).

The machine is shared (2 cores): timings are indicative. ``--quick``: one round.
Without root or wireguard-go it prints ``{"skipped": REASON}``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from benchmarks.fanout import percentile
from lab.harness import Agent, Lab, Wiregate, lab_requirements
from lab.nat import (
    MATRIX_AGENT_ENV,
    MATRIX_KINDS,
    PREDICTED,
    best_path,
    build_matrix,
    path_problem,
    peer_reports,
    start_matrix_relays,
)

__all__ = ["run"]

ROUNDS = 5
SETTLE_TIMEOUT_S = 150.0

Reports = dict[tuple[str, str], dict[str, Any]]


def _with_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set ``env`` in this process (inherited by what the lab spawns); the old values."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore(old: dict[str, str | None]) -> None:
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _settle(
    wg: Wiregate, agents: dict[str, Agent], timeout: float
) -> tuple[Reports, float, list[str]]:
    """Poll until every pair is on its best path (or ``timeout``): the last reports, how
    long it took, and the pairs still off their best path then (``a->b: problem``)."""
    started = time.monotonic()
    while True:
        reports = peer_reports(wg, agents)
        wrong = [
            f"{a}->{b}: {problem}"
            for (a, b), r in reports.items()
            if (problem := path_problem(a, b, r)) is not None
        ]
        elapsed = time.monotonic() - started
        if (reports and not wrong) or elapsed > timeout:
            return reports, elapsed, wrong
        time.sleep(1.0)


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        if isinstance(doc, dict):
            lines.append(doc)
    return lines


def _timestamp(doc: dict[str, Any]) -> float:
    stamp = str(doc["timestamp"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def _first_seen(agents: dict[str, Agent], ids: dict[str, str]) -> dict[tuple[str, str], float]:
    """(viewer, peer) -> when the viewer's path machine for the peer first logged."""
    names = {device: name for name, device in ids.items()}
    seen: dict[tuple[str, str], float] = {}
    for name, agent in agents.items():
        assert agent.proc is not None
        for doc in _log_lines(agent.proc.log):
            peer = names.get(str(doc.get("peer")))
            if doc.get("event") == "path" and peer is not None:
                seen.setdefault((name, peer), _timestamp(doc))
    return seen


def _bursts(agents: dict[str, Agent]) -> list[int]:
    """The probes of every port prediction the agents logged."""
    out = []
    for agent in agents.values():
        assert agent.proc is not None
        out += [
            int(doc["probes"])
            for doc in _log_lines(agent.proc.log)
            if doc.get("event") == "port prediction sent"
        ]
    return out


def one_round(timeout: float) -> dict[str, Any]:
    """The matrix from cold once: per-pair outcome and time to direct, bursts, settle time."""
    with Lab() as lab:
        wg, ca_file, _ = start_matrix_relays(lab)
        hosts = build_matrix(lab)
        old = _with_env(MATRIX_AGENT_ENV)
        try:
            key = wg.create_key()
            agents = {
                name: wg.start_agent(host, key, ca_file=ca_file) for name, host in hosts.items()
            }
            statuses = wg.wait_mesh(list(agents.values()), timeout=120)
        finally:
            _restore(old)
        reports, settle, unsettled = _settle(wg, agents, timeout)
        ids = {name: str(doc["device"]["id"]) for name, doc in statuses.items()}
        seen = _first_seen(agents, ids)
        pairs = []
        for a, b in itertools.combinations(sorted(MATRIX_KINDS), 2):
            if best_path(a, b)[0] != "direct":
                continue
            ends = [reports.get((a, b), {}), reports.get((b, a), {})]
            direct = all(r.get("path") == "direct" for r in ends)
            took = None
            if direct and (a, b) in seen and (b, a) in seen:
                began = max(seen[(a, b)], seen[(b, a)])
                took = max(0.0, max(float(r["since"]) for r in ends) - began)
            predicted = any(PREDICTED in str(r.get("reason")) for r in ends)
            pairs.append({"pair": f"{a}<->{b}", "direct": direct, "s": took, "pred": predicted})
        for line in unsettled:
            print(f"not on its best path after {settle:.0f} s: {line}", flush=True)
        return {"pairs": pairs, "bursts": _bursts(agents), "settle": settle, "off": unsettled}


def run(rounds: int, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, float]:
    results = [one_round(timeout) for _ in range(rounds)]
    pairs = [p for r in results for p in r["pairs"]]
    plain = [p["s"] for p in pairs if p["s"] is not None and not p["pred"]]
    predicted = [p["s"] for p in pairs if p["s"] is not None and p["pred"]]
    bursts = [b for r in results for b in r["bursts"]]
    figures = {
        "direct_pair_rate": round(sum(p["direct"] for p in pairs) / max(len(pairs), 1), 4),
        "time_to_direct_p99_s": round(percentile(plain, 99), 3) if plain else -1.0,
        "time_to_direct_p50_s": round(percentile(plain, 50), 3) if plain else -1.0,
        "time_to_direct_predicted_p99_s": round(percentile(predicted, 99), 3)
        if predicted
        else -1.0,
        "prediction_probes": float(max(bursts, default=0)),
        "prediction_bursts": round(len(bursts) / rounds, 2),
        "paths_rounds": float(rounds),
        "paths_settle_max_s": round(max(r["settle"] for r in results), 2),
        "paths_unsettled_pairs": float(sum(len(r["off"]) for r in results)),
    }
    missed = [p["pair"] for p in pairs if not p["direct"]]
    slow = {p["pair"]: round(p["s"], 1) for p in pairs if p["s"] is not None and p["s"] > 5.0}
    if missed or slow:
        print(f"pairs not direct: {missed}; direct after over 5 s: {slow}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="direct-path rate of the NAT matrix")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--timeout", type=float, default=SETTLE_TIMEOUT_S)
    args = parser.parse_args()
    if reason := lab_requirements():
        print(json.dumps({"skipped": reason}))
    else:
        emit(run(1 if args.quick else args.rounds, args.timeout))


if __name__ == "__main__":
    main()

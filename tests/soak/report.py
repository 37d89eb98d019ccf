"""The soak's report: figures from the samples and the traffic, failures against the
profile's bounds, and a human summary."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from tests.soak.checks import check_rss_growth
from tests.soak.probes import Sample, iperf_figures, parse_ping, rotation_window
from tests.soak.profile import PINGS, STRICT_PINGS, Profile, Rotation

__all__ = ["assemble", "format_summary", "traffic_figures"]


def resource_figures(
    profile: Profile, result: dict[str, Any], replicas: int
) -> tuple[dict[str, Any], list[str]]:
    bounds = profile.bounds
    samples = [Sample(**s) for s in result["samples"]]
    figures: dict[str, Any] = {}
    failures = []
    start = result["churn_started"]
    for replica in range(replicas):
        mine = [s for s in samples if s.replica == replica]
        base = next(s for s in mine if s.label == "baseline")
        after = next(s for s in mine if s.label == "after")
        churned = [(s.t - start, s.rss_kb) for s in mine if s.label in ("churn", "end")]
        where = f"replica {replica}"
        rss, problems = check_rss_growth(
            where, churned, profile.warmup_minutes * 60, bounds.rss_growth, bounds.rss_window_s
        )
        failures += problems
        peak = max(mine, key=lambda s: s.connected)
        figures[f"replica{replica}"] = {
            "baseline": {"fds": base.fds, "tasks": base.tasks, "rss_kb": base.rss_kb,
                         "connected": base.connected},
            "peak": {"fds": max(s.fds for s in mine), "tasks": max(s.tasks for s in mine),
                     "rss_kb": max(s.rss_kb for s in mine), "connected": peak.connected},
            "rss": rss,
            "after": {"fds": after.fds, "tasks": after.tasks, "rss_kb": after.rss_kb,
                      "connected": after.connected},
            "fds_baseline": result["fds_baseline"][replica],
            "fds_after": result["fds_after"][replica],
        }  # fmt: skip
        pool = [result[k][replica].get("unix (unnamed)", 0) for k in ("fds_baseline", "fds_after")]
        if after.fds - pool[1] > base.fds - pool[0] + bounds.fd_slack:
            failures.append(f"{where}: {after.fds - pool[1]} fds after (not counting the "
                            f"database pool), baseline {base.fds - pool[0]} "
                            f"(bound +{bounds.fd_slack})")  # fmt: skip
        if pool[1] > pool[0] + bounds.db_pool:
            failures.append(f"{where}: {pool[1]} unix client sockets after, baseline "
                            f"{pool[0]} (bound +{bounds.db_pool}, the pool size)")  # fmt: skip
        if abs(after.tasks - base.tasks) > bounds.task_slack:
            failures.append(f"{where}: {after.tasks} tasks after, baseline {base.tasks} "
                            f"(bound +-{bounds.task_slack})")  # fmt: skip
        if after.connected != base.connected:
            failures.append(f"{where}: {after.connected} streams after, {base.connected} before")
    return figures, failures


def traffic_figures(
    profile: Profile,
    rotations: Sequence[Rotation],
    outputs: Mapping[str, str],
    agent_logs: Mapping[str, str],
) -> tuple[dict[str, Any], list[str]]:
    """iperf3 and ping figures (``outputs``: each traffic process's output by name), and
    the echoes lost around each rotation (its window from ``agent_logs``)."""
    failures = []
    iperf = iperf_figures(outputs["iperf3-client"])
    if "error" in iperf:
        failures.append(f"iperf3: {iperf['error']}")
    elif iperf["min_interval_mbps"] <= 0:
        failures.append("iperf3: an interval carried nothing (a tunnel stalled)")
    pings: dict[str, Any] = {}
    logs = {}
    for src, dst in PINGS:
        log = parse_ping(outputs[f"ping-{src}-{dst}"])
        logs[(src, dst)] = log
        pings[f"{src}->{dst}"] = {"sent": log.sent, "received": len(log.replies),
                                  "lost": len(log.lost())}  # fmt: skip
    rows = []
    for r in rotations:
        r.registered, r.switched = rotation_window(agent_logs[r.host], r.start) or (None, None)
        start, end = r.window()
        paths = [path for path in logs if r.host in path]
        lost = {f"{src}->{dst}": logs[src, dst].lost_between(start, end) for src, dst in paths}
        strict = sum(logs[path].lost_between(start, end) for path in paths if path in STRICT_PINGS)
        switch = None if r.switched is None or r.registered is None else r.switched - r.registered
        rows.append({
            **asdict(r), "lost": lost, "cli_seconds": round(r.end - r.start, 2),
            "switch_seconds": switch and round(switch, 3),
        })  # fmt: skip
        if not r.ok:
            failures.append(f"rotate on {r.host} failed: {r.detail}")
        if strict > profile.bounds.rotation_loss:
            failures.append(f"rotate on {r.host} at {r.start:.1f}: lost {lost}")
    if len(rotations) < 3:
        failures.append(f"only {len(rotations)} rotations of real agents happened")
    for (src, dst), log in logs.items():
        name = f"{src}->{dst}"
        windows = [r.window() for r in rotations if r.host in (src, dst)]
        outside = [t for t in log.lost_at() if not any(a <= t <= b for a, b in windows)]
        pings[name]["lost_outside_rotations"] = len(outside)
        bound = profile.bounds.ping_loss
        if (src, dst) not in STRICT_PINGS:
            bound = profile.bounds.receiver_ping_loss
        if len(log.lost()) > bound * max(1, log.sent):
            failures.append(f"ping {name}: lost {len(log.lost())} of {log.sent}")
    return {"iperf": iperf, "ping": pings, "rotations": rows}, failures


def fleet_failures(fleet: dict[str, Any]) -> list[str]:
    counts = fleet["counts"]
    failures = [f"simulated agents: {e}" for e in fleet["errors"][:10]]
    for needed in ("enroll", "rotate", "rotate_switched", "endpoints", "reconnect",
                   "admin_delete", "revoked_seen", "departed"):  # fmt: skip
        if not counts.get(needed):
            failures.append(f"simulated agents never did {needed!r}")
    return failures


def assemble(
    profile: Profile,
    result: dict[str, Any],
    tunnels: dict[str, Any],
    traffic_failures: list[str],
    started: float,
) -> dict[str, Any]:
    """The report: figures, counts, and every failure (empty: passed)."""
    resources, failures = resource_figures(profile, result, profile.replicas)
    failures += traffic_failures + fleet_failures(result["fleet"])
    for name, problems in result["invariants"]["problems"].items():
        failures += [f"{name}: {p}" for p in problems[:10]]
    return {
        "profile": asdict(profile),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "resources": resources,
        "tunnels": tunnels,
        "fleet": result["fleet"],
        "invariants": {k: v for k, v in result["invariants"].items() if k != "problems"}
        | {"problems": {k: len(v) for k, v in result["invariants"]["problems"].items()}},
        "samples": result["samples"],
        "failures": failures,
    }


def format_summary(report: dict[str, Any]) -> str:
    """A human summary of a report."""
    p, inv, tun = report["profile"], report["invariants"], report["tunnels"]
    lines = [
        f"soak {p['name']}: {p['agents']} simulated agents, {p['replicas']} replica(s), "
        f"{p['minutes']} min churn, {report['wall_seconds']} s wall",
        f"  fleet: {json.dumps(report['fleet']['counts'])}",
        f"  invariants at version {inv['version']}: {inv['live_devices']} live devices, "
        f"{inv['maps_checked']} maps checked, settled in {inv['settle_seconds']} s, "
        f"{inv['resumed']} resumed with since; problems {inv['problems']}",
    ]
    for name, r in report["resources"].items():
        lines.append(
            f"  {name}: fds {r['baseline']['fds']} -> peak {r['peak']['fds']} -> "
            f"after {r['after']['fds']}; tasks {r['baseline']['tasks']} -> peak "
            f"{r['peak']['tasks']} -> after {r['after']['tasks']}; RSS after warm-up "
            f"{r['rss'].get('rss_kb_after_warmup')} -> {r['rss'].get('rss_kb_at_end')} KiB "
            f"({r['rss'].get('rss_growth', 0):+.1%}), "
            f"peak streams {r['peak']['connected']}"
        )
    iperf = tun["iperf"]
    lines.append(
        f"  iperf3 a->b: {iperf.get('received_mbps')} Mbit/s received, min 10 s interval "
        f"{iperf.get('min_interval_mbps')}, retransmits {iperf.get('retransmits')}"
    )
    lines.append(f"  ping: {json.dumps(tun['ping'])}")
    lost = [sum(r["lost"].values()) for r in tun["rotations"]]
    lines.append(
        f"  rotations of real agents: {len(lost)}, echoes lost around them: {lost}, "
        f"registered -> switched (s): {[r['switch_seconds'] for r in tun['rotations']]}"
    )
    lines.append("  PASSED" if not report["failures"] else "  FAILED:")
    lines += [f"    - {f}" for f in report["failures"]]
    return "\n".join(lines)

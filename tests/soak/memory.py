"""The memory soak: the simulated agents churn against gateway replicas on loopback, and
the replicas' memory is watched.

``python -m tests.soak.memory [--minutes N] [--warmup-minutes N] [--agents N]
[--replicas N] [--trace] [--snapshots M,M,…] [--top N] [--out FILE [--section NAME]]``

No network namespace and no data plane (tests/soak/driver.py has both): a throwaway
PostgreSQL (lab/pg.py), ``replicas`` ``wiregate gateway`` processes on 127.0.0.1 and
the simulated fleet of tests/soak/sim.py, with the soak's policy. Each replica's
VmRSS is sampled every 10 s; the run fails when it grew by ``rss_growth`` or more
from the end of the warm-up to the end of the churn (:func:`checks.check_rss_growth`).

With ``--trace`` the replicas run under tracemalloc (tests/soak/traced.py): at each
``--snapshots`` mark (minutes of churn) every replica dumps a snapshot, and the
growth between the first mark and each later one is printed, grouped by traceback,
largest first. RSS figures of a traced run include tracemalloc's own bookkeeping:
take the bound from an untraced run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.harness import poll
from lab.pg import PgServer, _free_port
from tests.soak import checks
from tests.soak.driver import create_keys, unix_database_url
from tests.soak.probes import proc_figures
from tests.soak.profile import Bounds
from tests.soak.sim import Fleet, FleetConfig
from tests.soak.traced import SNAPSHOT_PATTERN, STATS_FILE
from wiregate.cli.admin_client import AdminClient

__all__ = ["Gateway", "growth", "main"]

SAMPLE_EVERY_S = 10.0
_PROJECT = str(Path(__file__).resolve().parents[2])


@dataclass
class Gateway:
    """One replica: its process, base URL, admin socket and snapshot directory."""

    index: int
    proc: subprocess.Popen[bytes]
    url: str
    admin_socket: Path
    snapshots: Path

    def stats(self, churn_started: float) -> list[dict[str, Any]]:
        """The replica's memory figures (tests/soak/traced.py), one per sample, each
        with ``t_min``: minutes into the churn."""
        path = self.snapshots / STATS_FILE
        lines = path.read_text().splitlines() if path.exists() else []
        offset = time.time() - time.monotonic() + churn_started
        return [{"t_min": round((d.pop("time") - offset) / 60, 2), **d}
                for d in map(json.loads, lines)]  # fmt: skip

    def ask_snapshot(self) -> Path:
        """Ask the replica for a snapshot (SIGUSR1); where it will be."""
        taken = len(list(self.snapshots.glob(SNAPSHOT_PATTERN.format("*"))))
        self.proc.send_signal(signal.SIGUSR1)
        return self.snapshots / SNAPSHOT_PATTERN.format(taken)

    def load_snapshot(self, path: Path, timeout: float = 900.0) -> tracemalloc.Snapshot:
        """The snapshot asked for, once written (a big traced heap takes minutes)."""
        poll(path.exists, timeout=timeout, what=f"replica {self.index} {path.name}")
        return tracemalloc.Snapshot.load(str(path))


def start_gateway(workdir: Path, index: int, env: dict[str, str], trace: bool) -> Gateway:
    directory = workdir / f"gateway{index}"
    directory.mkdir(parents=True, exist_ok=True)
    port, metrics = _free_port(), _free_port()
    admin_socket = directory / "gw.sock"
    snapshots = directory / "memory"
    log = (directory / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.soak.traced", "gateway", "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", f"127.0.0.1:{metrics}", "--state-dir", str(directory),
         "--admin-socket", str(admin_socket)],
        env={**os.environ, **env, "WIREGATE_TRACEMALLOC_DIR": str(snapshots),
             "WIREGATE_TRACEMALLOC_FRAMES": "10" if trace else "0"},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    gateway = Gateway(index, proc, f"http://127.0.0.1:{port}", admin_socket, snapshots)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway {index} exited: see {directory / 'gateway.log'}")
        return admin_socket.exists()

    poll(ready, timeout=300, what=f"gateway {index} admin socket")
    return gateway


def growth(old: tracemalloc.Snapshot, new: tracemalloc.Snapshot, top: int) -> list[str]:
    """The ``top`` allocation sites that grew most from ``old`` to ``new``, grouped by
    traceback, one block of lines each: the allocating frame, then the innermost frames
    of the project (this checkout, outside the virtualenv and the standard library)."""
    lines = []
    grew = [stat for stat in new.compare_to(old, "traceback") if stat.size_diff > 0]
    for stat in sorted(grew, key=lambda stat: -stat.size_diff)[:top]:
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d} blocks), "
                     f"now {stat.size / 1024:.1f} KiB")  # fmt: skip
        *outer, inner = stat.traceback  # oldest first, the allocating frame last
        ours = [f for f in reversed(outer) if f.filename.startswith(_PROJECT)
                and "/." not in f.filename]  # fmt: skip
        for frame in [inner, *ours[:5]]:
            lines.append(f"    {frame.filename}:{frame.lineno}")
    return lines


@dataclass
class Plan:
    """What one run does."""

    minutes: float
    warmup_minutes: float
    agents: int
    replicas: int
    trace: bool
    marks: tuple[float, ...]  # minutes of churn at which traced replicas dump a snapshot
    top: int
    bounds: Bounds


async def churn(plan: Plan, gateways: list[Gateway]) -> dict[str, Any]:
    """Run the fleet for ``plan.minutes``; the samples and the snapshot comparisons."""
    keys = await create_keys(AdminClient(socket=gateways[0].admin_socket))
    keys.pop("real")
    fleet = Fleet(FleetConfig(
        gateways=tuple(g.url for g in gateways),
        admin_sockets=tuple(g.admin_socket for g in gateways),
        keys=keys, agents=plan.agents, probes=8, ephemeral=plan.agents // 10,
        mean_action_s=20.0, mean_delete_s=20.0,
    ))  # fmt: skip
    samples: list[dict[str, Any]] = []
    reports: dict[str, list[str]] = {}
    first: dict[int, tracemalloc.Snapshot] = {}
    started = time.monotonic()
    marks = list(plan.marks)

    def sample() -> None:
        t = round((time.monotonic() - started) / 60, 2)
        for g in gateways:
            samples.append({"t_min": t, "replica": g.index, "rss_kb": proc_figures(g.proc.pid)[1]})
            g.proc.send_signal(signal.SIGUSR2)  # the allocator's figures, into stats.jsonl

    async def snapshots(mark: float) -> None:
        paths = [g.ask_snapshot() for g in gateways]
        for g, path in zip(gateways, paths, strict=True):
            snap = await asyncio.to_thread(g.load_snapshot, path)
            if g.index not in first:
                first[g.index] = snap
                continue
            label = f"replica {g.index}: growth from {plan.marks[0]} to {mark} min"
            reports[label] = growth(first[g.index], snap, plan.top)
            print(label, *reports[label], sep="\n  ", flush=True)

    try:
        await fleet.start(ramp_s=min(30.0, plan.minutes * 15))
        while (elapsed := time.monotonic() - started) < plan.minutes * 60:
            sample()
            if plan.trace and marks and elapsed >= marks[0] * 60:
                await snapshots(marks.pop(0))
            await asyncio.sleep(min(SAMPLE_EVERY_S, plan.minutes * 60 - elapsed))
        sample()
    finally:
        await fleet.stop()
        await fleet.close()
    return {
        "fleet": fleet.summary(),
        "samples": samples,
        "tracemalloc": reports,
        "allocator": {f"replica{g.index}": g.stats(started) for g in gateways},
    }


def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Start PostgreSQL and the replicas, churn, and judge the RSS growth."""
    policy = workdir / "policy.yaml"
    policy.write_text(checks.POLICY_YAML)
    started = time.time()
    with PgServer() as pg:
        database_url = pg.create_database("memsoak")
        env = {
            "WIREGATE_DATABASE_URL": unix_database_url(pg, database_url),
            "WIREGATE_POLICY_FILE": str(policy),
            "WIREGATE_EPHEMERAL_TIMEOUT": "10",
            "WIREGATE_EXPIRY_SWEEP_INTERVAL": "3",
            "WIREGATE_LOG_FORMAT": "json",
        }
        gateways: list[Gateway] = []
        try:
            for index in range(plan.replicas):
                gateways.append(start_gateway(workdir, index, env, plan.trace))
            result = asyncio.run(churn(plan, gateways))
        finally:
            for g in gateways:
                g.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    g.proc.wait(timeout=20)
                if g.proc.poll() is None:
                    g.proc.kill()
    figures, failures = {}, []
    for g in gateways:
        mine = [
            (s["t_min"] * 60, s["rss_kb"]) for s in result["samples"] if s["replica"] == g.index
        ]
        figure, problems = checks.check_rss_growth(
            f"replica {g.index}",
            mine,
            plan.warmup_minutes * 60,
            plan.bounds.rss_growth,
            plan.bounds.rss_window_s,
        )
        figures[f"replica{g.index}"] = figure
        failures += problems
    return {
        "plan": {**plan.__dict__, "bounds": None, "rss_growth_bound": plan.bounds.rss_growth},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "rss": figures,
        **result,
        "failures": failures,
    }


def write_report(path: Path, report: dict[str, Any], section: str | None) -> None:
    """``report`` as ``path``, or as its ``section`` key (the file's other keys kept)."""
    doc: dict[str, Any] = report
    if section is not None:
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc[section] = report
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.memory", description=__doc__)
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--trace", action="store_true", help="run the replicas under tracemalloc")
    parser.add_argument("--snapshots", default="2,10", help="minutes of churn (with --trace)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, help="write the report (JSON) here")
    parser.add_argument("--section", help="into this key of --out, keeping the file's others")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    plan = Plan(
        args.minutes, args.warmup_minutes, args.agents, args.replicas, args.trace,
        tuple(float(m) for m in args.snapshots.split(",")), args.top, Bounds(),
    )  # fmt: skip
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wiregate-memsoak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = run(plan, workdir)
    for name, figure in report["rss"].items():
        print(f"{name}: {json.dumps(figure)}")
    print("PASSED" if not report["failures"] else "FAILED:", *report["failures"], sep="\n  ")
    if args.out:
        write_report(args.out, report, args.section)
    print(f"lab directory: {workdir}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

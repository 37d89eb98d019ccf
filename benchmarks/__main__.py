"""``python -m benchmarks``: run the benchmarks and write ``benchmarks/results.json``.

Each benchmark runs as its own process (``python -m benchmarks.NAME``) and prints
one JSON object of figure name → number as its last line of output. A benchmark
that cannot run here prints ``{"skipped": REASON}``; one that fails, times out or
prints no figures is recorded the same way (``NAME_skipped``: why, never a figure)
and fails the run. Every figure written comes from this run, with the commit
(``git rev-parse HEAD`` and whether the tree was dirty) and the date
(:mod:`benchmarks.record`).

``python -m benchmarks NAME...`` runs some: their figures replace theirs in the
file, the others keep theirs, each benchmark's provenance recorded. ``--quick``
runs the benchmarks that take seconds (:data:`QUICK`), writes no file unless
``--output`` says where, and fails when a same-run ratio leaves its band
(:data:`benchmarks.record.BANDS`); CI runs it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.record import BANDS, Provenance, check_bands, merge

BENCHMARKS = (
    "netmap",
    "reconcile",
    "fanout",
    "enroll",
    "revoke",
    "replicas",
    "failover",
    "tunnel",
    "bootstrap",
    "kernel_reconcile",
    "connect",
    "relay",
    "relay_tunnel",
    "stun",
    "paths",
    "heatmap",
    "dns",
    "host_tunnel",
    "pod_policy",
    "pod_enforce",
)
RESULTS = Path(__file__).with_name("results.json")
QUICK = ("netmap", "reconcile", "enroll")  # seconds each; those present are run
ROOT = Path(__file__).resolve().parents[1]


def run_one(name: str, timeout: float) -> tuple[dict[str, float | str], bool]:
    """The figures of one benchmark (or its ``NAME_skipped``), and whether it failed."""
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        return {f"{name}_skipped": f"no module benchmarks/{name}.py"}, True
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {f"{name}_skipped": f"failed: timed out after {timeout:.0f} s"}, True
    took = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"{name}: FAILED after {took:.0f}s\n{proc.stderr[-4000:]}", file=sys.stderr)
        last = (proc.stderr.strip().splitlines() or ["no figures printed"])[-1][:200]
        return {f"{name}_skipped": f"failed (exit {proc.returncode}): {last}"}, True
    figures = json.loads(lines[-1])
    said = [line for line in proc.stdout.splitlines() if not line.strip().startswith("{")]
    for line in said + proc.stderr.splitlines()[-40:]:  # what the benchmark reported
        print(f"  {name}| {line}", file=sys.stderr)
    print(f"{name}: {took:.0f}s {json.dumps(figures)}", file=sys.stderr)
    if "skipped" in figures:
        return {f"{name}_skipped": str(figures["skipped"])}, False
    return {k: float(v) for k, v in figures.items()}, False


def provenance() -> Provenance:
    """This checkout's commit, whether its tree differs from it, and the date (UTC)."""
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    try:
        head = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain").strip())
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", None
    return {"commit": head, "dirty": dirty, "date": date}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=ROOT, timeout=30
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: every one)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="the quick ones, checked")
    parser.add_argument("--output", type=Path, help="where to write (default: results.json)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    quick = [n for n in QUICK if importlib.util.find_spec(f"benchmarks.{n}") is not None]
    names = quick if args.quick else args.names or list(BENCHMARKS)
    run = provenance()
    measured: dict[str, dict[str, float | str]] = {}
    failed = []
    for name in names:
        figures, broke = run_one(name, args.timeout)
        measured[name] = figures
        if broke or (args.quick and f"{name}_skipped" in figures):
            failed.append(name)
    output = args.output or (None if args.quick else RESULTS)
    partial = not args.quick and set(names) != set(BENCHMARKS)
    previous = _read(output) if partial and output is not None else None
    doc = merge(previous, measured, run, BENCHMARKS)
    if output is not None:
        output.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc, indent=2, sort_keys=True))
    return _verdict(doc, names, failed, check=args.quick)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _verdict(doc: dict[str, Any], names: list[str], failed: list[str], *, check: bool) -> int:
    for name in failed:
        print(f"{name}: {doc.get(f'{name}_skipped', 'failed')}", file=sys.stderr)
    bands = {k: v for k, v in BANDS.items() if any(k.startswith(f"{n}_") for n in names)}
    outside = check_bands(doc, bands) if check else []
    for line in outside:
        print(f"outside its band: {line}", file=sys.stderr)
    return 1 if failed or outside else 0


if __name__ == "__main__":
    raise SystemExit(main())

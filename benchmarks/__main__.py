"""``python -m benchmarks``: run every benchmark and write ``benchmarks/results.json``.

Each benchmark runs as its own process (``python -m benchmarks.NAME``) and prints
one JSON object of figure name → number as its last line of output. Figures are
measured by this run; a benchmark that fails is reported and leaves its figures out.
A benchmark that cannot run here prints ``{"skipped": REASON}``: the reason is
recorded as ``NAME_skipped`` (never a figure) and the run does not fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = (
    "netmap",
    "reconcile",
    "fanout",
    "replicas",
    "failover",
    "tunnel",
    "bootstrap",
    "kernel_reconcile",
)
RESULTS = Path(__file__).with_name("results.json")


def run_one(name: str, timeout: float) -> dict[str, float | str]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    took = time.monotonic() - started
    if proc.returncode != 0:
        print(f"{name}: FAILED after {took:.0f}s\n{proc.stderr[-4000:]}", file=sys.stderr)
        return {}
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    figures = json.loads(lines[-1])
    print(f"{name}: {took:.0f}s {json.dumps(figures)}", file=sys.stderr)
    if "skipped" in figures:
        return {f"{name}_skipped": str(figures["skipped"])}
    return {k: float(v) for k, v in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    results: dict[str, float | str] = {}
    if RESULTS.exists() and args.names != list(BENCHMARKS):
        results = json.loads(RESULTS.read_text())
    failed = []
    for name in args.names:
        figures = run_one(name, args.timeout)
        if not figures:
            failed.append(name)
        elif f"{name}_skipped" not in figures:
            results.pop(f"{name}_skipped", None)
        results.update(figures)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

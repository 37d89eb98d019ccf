"""``python -m tests.soak [--profile full|ci] [--minutes N] [--agents N] [--replicas N]``:
run the soak, print its summary, write the report as JSON; exit 1 if it failed."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.soak.driver import run_soak
from tests.soak.profile import profile_for
from tests.soak.report import format_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--profile", choices=("full", "ci"), default="full")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--agents", type=int)
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/soak.json"))
    parser.add_argument("--workdir", type=Path, help="lab directory (default: a temporary one)")
    args = parser.parse_args(argv)
    profile = profile_for(args.profile, args.minutes, args.agents, args.replicas)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wiregate-soak-"))
    report = run_soak(profile, workdir)
    print(format_summary(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    memory = {"memory": kept["memory"]} if "memory" in kept else {}  # scripts/soak.sh memory
    args.out.write_text(json.dumps(report | memory, indent=1) + "\n")
    print(f"report: {args.out} (lab logs: {workdir})")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

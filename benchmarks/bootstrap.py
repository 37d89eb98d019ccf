"""VM bootstrap: ``deploy/bootstrap.sh`` start → first packet to a pod address.

The lab of tests/lab/test_bootstrap.py: a gateway serving its own wheelhouse (built
once with ``wiregate wheelhouse build`` for this machine) and a Kubernetes-node agent
with a pod (10.244.1.10) behind it; each round adds a fresh, offline "VM" namespace
(no default route) and scratch root where the real script runs the default install
path — the gateway's pinned requirements, its /simple/ index, ``--require-hashes`` —
with wireguard-tools and wireguard-go already installed, the userspace backend and
the systemctl shim. The clock starts with the script and stops at the first ping
reply from the pod through the tunnel. ``python -m benchmarks.bootstrap`` prints one JSON object:

- ``bootstrap_s``: median over rounds (target < 10 s), ``bootstrap_min_s`` the best;
- ``bootstrap_script_s``: median time the whole script ran (it compiles bytecode and
  confirms the enrollment after the agent is up);
- ``bootstrap_rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from lab.harness import Lab, Wiregate, lab_requirements
from lab.vm import VM, build_wheelhouse, serve_wheelhouse, start_cluster_node

__all__ = ["run"]


def run(rounds: int) -> dict[str, float]:
    reason = lab_requirements()
    if reason:
        raise SystemExit(f"bootstrap benchmark: {reason}")
    first, script = [], []
    with tempfile.TemporaryDirectory(prefix="wiregate-bench-") as tmp, Lab() as lab:
        house = build_wheelhouse(Path(tmp) / "wheelhouse")
        gateway = Wiregate(lab)
        serve_wheelhouse(gateway, house)
        gateway.start_gateway()
        key_file = gateway.create_key(tags="tag:lab", expiry="1h", reusable=True)
        start_cluster_node(lab, gateway, lab.add_host("node"), key_file)
        for index in range(rounds):
            vm = VM(lab, lab.add_host(f"vm{index}"), None, key_file, gateway.server)
            first_packet, script_s = vm.join_timed()
            print(f"round {index}: first packet {first_packet:.2f} s, script {script_s:.2f} s",
                  file=sys.stderr)  # fmt: skip
            first.append(first_packet)
            script.append(script_s)
    return {
        "bootstrap_s": round(statistics.median(first), 2),
        "bootstrap_min_s": round(min(first), 2),
        "bootstrap_script_s": round(statistics.median(script), 2),
        "bootstrap_rounds": float(rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.rounds)))


if __name__ == "__main__":
    main()

"""Reconcile cost on the userspace backend: ``python -m benchmarks.reconcile`` prints JSON.

In a fresh network namespace: apply a 1 000-peer map through ``DataPlane.apply``
on a fresh wireguard-go interface, against ``wg setconf`` of the same WireGuard
config on another fresh wireguard-go interface (medians of a few repetitions);
then one peer's change after the full apply, then a no-op reconcile.

The agent's figure includes what ``wg setconf`` does not do: reading the device
back, validating the map, addresses, 2 000 routes in the table, the rule and MTU,
and the packet filter (``table inet wiregate`` created and its 2 000 elements
added through libnftables; the single change adds one element). The benchmark
refuses to report figures measured without the filter enforced.
Repetitions after the first find the per-peer validation memoized (same peers);
``reconcile_full_first_ms`` is the first, cold one. ``reconcile_resync_ms`` is a
no-op apply at the periodic resync (the data plane's clock moved past
``resync_interval``), which reads the device, the routes and the packet filter
back. ``reconcile_single_remove_ms`` (informational) is the single change undone
afterwards: a prefix removed, its filter element deleted.
``reconcile_wg_setconf_up_ms`` (informational; the ratio uses the plain figure)
is ``wg setconf`` onto an interface that is up, as the agent's is.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PEERS = 1000
REPEAT = 5
ROOT = Path(__file__).resolve().parents[1]


def run() -> dict[str, float]:
    """Run the benchmark in a throw-away namespace; always clean it up."""
    tag = secrets.token_hex(3)
    ns = f"wgbench{tag}"
    run_dir = Path(tempfile.mkdtemp(prefix="wgbench-"))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "benchmarks.reconcile",
                "--inner",
                tag,
                str(run_dir),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            timeout=600,
        )
        figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return figures
    finally:
        _kill_daemons(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        for sock in Path("/var/run/wireguard").glob(f"wgb*{tag}*.sock"):
            sock.unlink(missing_ok=True)


def _kill_daemons(run_dir: Path) -> None:
    for pid_file in run_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            if pid_file.stem.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, 9)
        except (OSError, ValueError):
            pass


# --- inside the namespace ----------------------------------------------------


def _peers() -> list[dict[str, Any]]:
    from wiregate.keys import encode_key, generate_private_key, public_from_private

    peers = []
    for i in range(PEERS):
        key = encode_key(public_from_private(generate_private_key()))
        host = i + 2
        v4 = f"100.64.{host >> 8}.{host & 0xFF}/32"
        v6 = f"fd7a:7767:6174::{host:x}/128"
        peers.append(
            {
                "id": f"d{i}",
                "name": f"peer{i}",
                "public_key": key,
                "addresses": [v4, v6],
                "allowed_ips": [v4, v6],
                "endpoints": [f"198.51.{100 + (i >> 8)}.{i & 0xFF}:51820"],
                "keepalive": None,
                "tags": [],
            }
        )
    return peers


def _netmap(private: bytes, peers: list[dict[str, Any]]) -> Any:
    from wiregate.keys import encode_key, public_from_private
    from wiregate.mapwire import read_full

    self_view = {
        "id": "me",
        "name": "me",
        "public_key": encode_key(public_from_private(private)),
        "addresses": ["100.64.0.1/32", "fd7a:7767:6174::1/128"],
    }
    return read_full({"version": 1, "self": self_view, "peers": peers})


def _setconf_text(private: bytes, port: int, peers: list[dict[str, Any]]) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {base64.b64encode(private).decode()}",
        f"ListenPort = {port}",
        "FwMark = 0xca6c",
    ]
    for p in peers:
        lines += [
            "",
            "[Peer]",
            f"PublicKey = {p['public_key']}",
            f"AllowedIPs = {', '.join(p['allowed_ips'])}",
            f"Endpoint = {p['endpoints'][0]}",
        ]
    return "\n".join(lines) + "\n"


def _time_setconf(iface: str, run_dir: Path, text: str, *, up: bool = False) -> float:
    from agent.dataplane.uapi import UapiBackend

    backend = UapiBackend(run_dir=run_dir)
    backend.create(iface)
    if up:  # as the agent's interface is: wireguard-go starts each peer's routines at once
        subprocess.run(["ip", "link", "set", iface, "up"], check=True)
    try:
        return _timed_setconf(iface, run_dir, text)
    finally:
        backend.delete(iface)


def _timed_setconf(iface: str, run_dir: Path, text: str) -> float:
    """Seconds ``wg setconf IFACE`` takes to apply ``text`` (written to a 0600 file first)."""
    fd, name = tempfile.mkstemp(dir=run_dir, suffix=".conf")  # 0600: holds the private key
    try:
        os.write(fd, text.encode())
        os.close(fd)
        started = time.perf_counter()
        subprocess.run(["wg", "setconf", iface, name], check=True)
        return time.perf_counter() - started
    finally:
        os.unlink(name)


class _Clock:
    """The data plane's injected clock, which the benchmark can move forward."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


def _dataplane(
    iface: str, port: int, private: bytes, run_dir: Path, clock: _Clock, backend: str = "userspace"
) -> Any:
    from agent.dataplane.facade import DataPlane

    return DataPlane(
        interface=iface,
        private_key=private,
        listen_port=port,
        fwmark=0xCA6C,
        table=51820,
        rule_priority=5210,
        backend=backend,
        run_dir=run_dir,
        clock=clock,
    )


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def _changed(peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    changed = [dict(p) for p in peers]
    changed[7]["allowed_ips"] = [*changed[7]["allowed_ips"], "10.77.0.0/24"]
    return changed


def _check_enforced(dp: Any, problems: tuple[str, ...]) -> None:
    """The figures count the packet filter: refuse to report them without it."""
    if problems or not dp.firewall.enforced:
        raise SystemExit(f"the packet filter is not enforced: {problems}")


def inner(tag: str, run_dir: Path) -> dict[str, float]:
    from wiregate.keys import generate_private_key

    private = generate_private_key()
    peers = _peers()
    netmap = _netmap(private, peers)
    kinds = ("ref", "ref_up", "full", "single", "noop", "resync", "remove")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    noop_writes = 0
    for rep in range(REPEAT):
        text = _setconf_text(private, 52820 + rep, peers)
        times["ref"].append(_time_setconf(f"wgbs{tag}{rep}", run_dir, text))
        text = _setconf_text(private, 53820 + rep, peers)
        times["ref_up"].append(_time_setconf(f"wgbu{tag}{rep}", run_dir, text, up=True))
        clock = _Clock()
        dp = _dataplane(f"wgba{tag}{rep}", 51820 + rep, private, run_dir, clock)
        dp.setup()
        try:
            took, result = _timed(dp.apply, netmap)
            times["full"].append(took)
            _check_enforced(dp, result.problems)
            took, result = _timed(dp.apply, _netmap(private, _changed(peers)))
            times["single"].append(took)
            _check_enforced(dp, result.problems)
            took, result = _timed(dp.apply, _netmap(private, _changed(peers)))
            times["noop"].append(took)
            clock.skew += 3600  # past resync_interval: the next apply reads everything back
            took, resync = _timed(dp.apply, _netmap(private, _changed(peers)))
            times["resync"].append(took)
            noop_writes = max(noop_writes, result.writes, resync.writes)
            took, undone = _timed(dp.apply, netmap)
            times["remove"].append(took)
            _check_enforced(dp, undone.problems)
        finally:
            dp.teardown()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "reconcile_ratio": med["full"] / med["ref"],
        "reconcile_single_frac": med["single"] / med["full"],
        "reconcile_noop_writes": float(noop_writes),
        "reconcile_full_ms": med["full"] * 1000,
        "reconcile_full_first_ms": times["full"][0] * 1000,
        "reconcile_wg_setconf_ms": med["ref"] * 1000,
        "reconcile_wg_setconf_up_ms": med["ref_up"] * 1000,
        "reconcile_single_ms": med["single"] * 1000,
        "reconcile_noop_ms": med["noop"] * 1000,
        "reconcile_resync_ms": med["resync"] * 1000,
        "reconcile_single_remove_ms": med["remove"] * 1000,
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--inner":
        print(json.dumps(inner(sys.argv[2], Path(sys.argv[3]))))
    else:
        print(json.dumps(run()))

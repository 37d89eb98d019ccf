"""Reconcile cost on kernel WireGuard: ``python -m benchmarks.kernel_reconcile`` prints JSON.

The kernel module is what production uses, and this machine's kernel has none,
so on such a host the benchmark boots Debian's kernel under QEMU (virtme-ng,
software emulation, as ``scripts/kernel-test.sh`` does), loads the module and
runs itself there; on a kernel that has the module it runs in place.

In a fresh network namespace, each round applies a 1 000-peer map through
``DataPlane.apply`` with the netlink backend (the agent's path: validation, the
generic-netlink writes of :mod:`agent.dataplane.wgnl`, addresses, the routes,
the rule, MTU and packet filter) on a fresh kernel interface, and ``wg setconf``
of the same WireGuard configuration on another fresh kernel interface; rounds
alternate which goes first. The map carries the tunnel address pool as the
gateway sends it (SELF ``pool``), so the routes are the pool's two prefixes,
not a host route per peer address. Figures (medians over the rounds):

- ``kernel_reconcile_ratio``: the agent's full apply / ``wg setconf`` (target ≤ 1.5);
- ``kernel_reconcile_full_ms``, ``kernel_reconcile_wg_setconf_ms``: the two times;
- ``kernel_reconcile_per_peer_routes_ms`` (informational): the same full apply of a
  map without the pool (an older gateway's), so with 2 000 host routes, on another
  fresh interface;
- ``kernel_reconcile_netlink_ms``: the netlink backend's write of the same 1 000
  peers alone (no routes), on a third fresh interface, and
  ``kernel_reconcile_write_ratio``: that write / ``wg setconf`` (what the WireGuard
  codec alone costs against ``wg``'s);
- ``kernel_reconcile_single_ms`` / ``kernel_reconcile_noop_ms``: one peer changed
  after the full apply, then the same map again (``kernel_reconcile_noop_writes``);
- ``kernel_reconcile_emulated``: 1 when measured in the software-emulated guest
  (absolute times are then several times a real machine's; the ratio is same-run).

Without QEMU, a kernel image or virtme-ng the benchmark prints
``{"skipped": REASON}`` and ``python -m benchmarks`` records the reason.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.reconcile import (
    _changed,
    _Clock,
    _dataplane,
    _netmap,
    _peers,
    _setconf_text,
    _timed_setconf,
)

__all__ = ["guest_command", "run"]

ROUNDS = 5
ROOT = Path(__file__).resolve().parents[1]
GUEST_TIMEOUT = 840.0  # within python -m benchmarks' 900 s per benchmark
MARK = "kernel-reconcile-result="
POOL = ("100.64.0.0/16", "fd7a:7767:6174::/64")  # the default pools: every peer is in them


def run() -> dict[str, Any]:
    """The figures, measured here if this kernel has WireGuard, else in the QEMU guest."""
    if Path("/sys/module/wireguard").exists():
        return _in_namespace()
    return _in_guest()


# --- on the host: boot the guest ---------------------------------------------


def guest_command(exec_line: str) -> list[str] | str:
    """The ``vng`` command running ``exec_line`` in the guest, or why it cannot run."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    vng = Path(sys.executable).with_name("vng")
    if not kernels:
        return "no kernel image in /boot (apt-get install linux-image-amd64)"
    if shutil.which("qemu-system-x86_64") is None:
        return "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
    if not vng.exists():
        return "no virtme-ng in the virtualenv (.venv/bin/pip install virtme-ng)"
    if os.geteuid() != 0:
        return "the guest runs as root on the host's filesystem: run as root"
    # --disable-kvm: KVM aborts on these machines ("failed to set MSR 0x10a").
    return [str(vng), "--run", str(kernels[-1]), "--user", "root", "--disable-kvm",
            "--memory", "2G", "--exec", exec_line]  # fmt: skip


def _in_guest() -> dict[str, Any]:
    module = f"{shlex.quote(sys.executable)} -m benchmarks.kernel_reconcile"
    cmd = guest_command(f"modprobe wireguard && {module}")
    if isinstance(cmd, str):
        return {"skipped": f"kernel_reconcile needs the QEMU guest: {cmd}"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GUEST_TIMEOUT, check=False
    )
    print(f"guest ran {time.monotonic() - started:.0f} s", file=sys.stderr)
    found = [ln.split(MARK, 1)[1] for ln in proc.stdout.splitlines() if MARK in ln]
    if not found:
        raise SystemExit(
            f"the guest printed no result (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    figures: dict[str, Any] = json.loads(found[-1])
    figures["kernel_reconcile_emulated"] = 1.0
    return figures


# --- where the module is: a throw-away namespace ------------------------------


def _in_namespace() -> dict[str, Any]:
    tag = secrets.token_hex(3)
    ns = f"wgkbench{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.kernel_reconcile",
             "--inner", tag],
            capture_output=True, text=True, check=True, cwd=ROOT, timeout=GUEST_TIMEOUT,
        )  # fmt: skip
        figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        figures.setdefault("kernel_reconcile_emulated", 0.0)
        return figures
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _time_setconf(iface: str, run_dir: Path, text: str) -> float:
    """``wg setconf`` of ``text`` onto a fresh kernel interface."""
    subprocess.run(["ip", "link", "add", iface, "type", "wireguard"], check=True)
    try:
        return _timed_setconf(iface, run_dir, text)
    finally:
        subprocess.run(["ip", "link", "del", iface], check=False)


def _time_netlink(iface: str, port: int, private: bytes, peers: list[dict[str, Any]]) -> float:
    """The netlink backend's write of the same peers alone onto a fresh kernel interface."""
    from agent.dataplane.backend import DeviceUpdate, PeerUpdate
    from agent.dataplane.netlink import NetlinkBackend

    updates = tuple(
        PeerUpdate(
            p["public_key"],
            allowed_ips=frozenset(ipaddress.ip_network(n) for n in p["allowed_ips"]),
            endpoint=p["endpoints"][0],
        )
        for p in peers
    )
    update = DeviceUpdate(private_key=private, listen_port=port, fwmark=0xCA6C, peers=updates)
    backend = NetlinkBackend()
    try:
        backend.create(iface)
        started = time.perf_counter()
        backend.write(iface, update)
        return time.perf_counter() - started
    finally:
        backend.delete(iface)
        backend.close()


def _pooled(private: bytes, peers: list[dict[str, Any]]) -> Any:
    """The map as the gateway sends it: with the tunnel address pool in SELF."""
    netmap = _netmap(private, peers)
    return replace(netmap, self_view=replace(netmap.self_view, pool=POOL))


def _time_agent(
    iface: str, port: int, private: bytes, run_dir: Path, peers: list[dict[str, Any]]
) -> list[Any]:
    """Full apply, one changed peer, the same map again: [s, s, s, no-op writes]."""
    netmap, changed = _pooled(private, peers), _pooled(private, _changed(peers))
    dp = _dataplane(iface, port, private, run_dir, _Clock(), backend="kernel")
    dp.setup()
    try:
        if dp.backend_name != "kernel":
            raise SystemExit(f"the data plane chose {dp.backend_name}, not the kernel")
        out: list[Any] = []
        for step in (netmap, changed):
            started = time.perf_counter()
            result = dp.apply(step)
            out.append(time.perf_counter() - started)
            if result.problems:
                raise SystemExit(f"the map was not applied whole: {result.problems}")
        started = time.perf_counter()
        result = dp.apply(changed)
        return [*out, time.perf_counter() - started, result.writes]
    finally:
        dp.teardown()


def _time_per_peer_routes(
    iface: str, port: int, private: bytes, run_dir: Path, peers: list[dict[str, Any]]
) -> float:
    """The full apply of the map without the pool: a host route per peer address."""
    dp = _dataplane(iface, port, private, run_dir, _Clock(), backend="kernel")
    dp.setup()
    try:
        netmap = _netmap(private, peers)
        started = time.perf_counter()
        dp.apply(netmap)
        return time.perf_counter() - started
    finally:
        dp.teardown()


def inner(tag: str) -> dict[str, float]:
    from wiregate.keys import generate_private_key

    private = generate_private_key()
    peers = _peers()
    kinds = ("ref", "full", "netlink", "single", "noop", "per_peer")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    noop_writes = 0
    with tempfile.TemporaryDirectory(prefix="wgkbench-") as tmp:
        run_dir = Path(tmp)
        for rnd in range(ROUNDS):
            text = _setconf_text(private, 52820 + rnd, peers)
            agent: list[Any] = []
            for first in (rnd % 2 == 0, rnd % 2 == 1):  # alternate which goes first
                if first:
                    times["ref"].append(_time_setconf(f"wgks{tag}{rnd}", run_dir, text))
                else:
                    agent = _time_agent(f"wgka{tag}{rnd}", 51820 + rnd, private, run_dir, peers)
            full, single, noop, writes = agent
            times["full"].append(full)
            times["single"].append(single)
            times["noop"].append(noop)
            noop_writes = max(noop_writes, int(writes))
            times["netlink"].append(_time_netlink(f"wgkn{tag}{rnd}", 53820 + rnd, private, peers))
            times["per_peer"].append(
                _time_per_peer_routes(f"wgkp{tag}{rnd}", 54820 + rnd, private, run_dir, peers)
            )
            report = ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items())
            print(f"round {rnd}: {report}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "kernel_reconcile_ratio": round(med["full"] / med["ref"], 3),
        "kernel_reconcile_full_ms": round(med["full"] * 1000, 1),
        "kernel_reconcile_wg_setconf_ms": round(med["ref"] * 1000, 1),
        "kernel_reconcile_per_peer_routes_ms": round(med["per_peer"] * 1000, 1),
        "kernel_reconcile_netlink_ms": round(med["netlink"] * 1000, 1),
        "kernel_reconcile_write_ratio": round(med["netlink"] / med["ref"], 3),
        "kernel_reconcile_single_ms": round(med["single"] * 1000, 1),
        "kernel_reconcile_noop_ms": round(med["noop"] * 1000, 1),
        "kernel_reconcile_noop_writes": float(noop_writes),
        "kernel_reconcile_peers": float(len(peers)),
        "kernel_reconcile_rounds": float(ROUNDS),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        print(json.dumps(inner(sys.argv[2])))
        return
    figures = run()
    if "skipped" not in figures:  # found by the host in the guest's console output
        print(MARK + json.dumps(figures), flush=True)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()

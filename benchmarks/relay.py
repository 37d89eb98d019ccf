"""Relay forwarding rate and latency: the real ``wiregate relay`` against a reference forwarder.

Three namespaces of one lab: ``a`` and ``b`` on the lab's internet bridge and the
relay host ``inet`` between them (the bridge's router). In ``inet`` run, side by
side: a ``wiregate relay`` with ``forward_path = "userspace"``, a second one as
configured by default (``auto``: the kernel path where nftables permits), and the
reference, a minimal batched forwarder (``recvmmsg``/``sendmmsg``, 64 a call, the
relay's own socket buffers). Each relay admits the pair a→b with gateway-format
tickets signed by a key its signers file trusts; both sides bind (ALLOCATE, BIND,
CONFIRM) from ``a:5000`` and ``b:6000``. The per-device bandwidth limit is set
above the offered load (the check still runs).

Throughput: a generator in ``a`` pinned to CPU 0 sends WireGuard transport-data
datagrams (type 4, reserved zero) of 96 and 1 392 bytes as fast as it can; the
forwarders run on CPU 1; ``b`` counts arrivals in an nftables counter and drops
them (no receiver process). Each path gets its best configuration: the Python
forwarders without packet steering (their ingress work then runs on the
generator's CPU); the default relay both without and with RPS steering the relay
host's ingress onto CPU 1 (what the kernel path wants on a quiet machine), the
better of the two counting in each round. The rate is counted
at ``b`` over a window inside the run; the loss is what ``b`` never saw of what
``a`` sent. Paths alternate within each round; ratios are medians of per-round
ratios.

Latency: single datagrams echoed by ``b`` back through the same path; the added
latency of a path is its round trip minus the median direct round trip a↔b.

``python -m benchmarks.relay [--quick]`` prints one JSON object:

- ``relay_ratio_100``, ``relay_ratio_1400``: the default relay's received rate
  over the reference's (target >= 1.0 with the kernel path);
- ``relay_user_ratio_100``, ``relay_user_ratio_1400``: the same for the
  userspace path (target >= 0.9);
- ``relay_p99_latency_ratio``: p99 added latency of the default relay over the
  reference's (target <= 1.2); ``relay_user_p99_latency_ratio`` for userspace;
- raw figures (medians): ``relay_{ref,user,default,default_rps}_{100,1400}_pps``
  (received/s), ``..._loss`` (fraction of what was sent), ``..._offered_pps``;
  ``..._cpu_us`` (CPU time of the forwarding process per datagram received: the
  figure least disturbed by other load); ``relay_user_cpu_ratio_{100,1400}``
  (userspace relay over reference, per datagram: ideally <= 1.1);
  ``relay_{user,default}_kernel_path`` (1 if that relay forwarded in the kernel);
  the p99 round trips and the direct p50 in microseconds.

Figures measured while other work loads the machine are indicative only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["run"]

SIZES = {"100": 96, "1400": 1392}  # WireGuard transport data: 16-byte header + 16n
A_PORT, B_PORT = 5000, 6000
REF_IN, REF_OUT = 7000, 7001
RELAYS = {  # name -> (control port, relay ports, STUN port, metrics port, forward_path)
    "user": (3480, "40000-40003", 3478, 9091, "userspace"),
    "default": (3490, "41000-41003", 3488, 9092, ""),
}
GEN_CPU, FORWARD_CPU = "0", "1"
BUFFER = 4 << 20
COUNTER = "table inet wgbench"


# --- roles: each runs inside a namespace as ``python -m benchmarks.relay ROLE ...`` -----


def _udp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    return sock


def role_bind(host: str, port: int, control: str, ticket_file: str) -> None:
    """ALLOCATE, BIND, CONFIRM from ``host:port``; print the relay port."""
    from relay.client.bind import (
        build_allocate,
        build_bind,
        build_confirm,
        parse_allocated,
        parse_bound,
        parse_challenge,
    )

    ticket = bytes.fromhex(Path(ticket_file).read_text().strip())
    relay_host, control_port = control.rsplit(":", 1)
    with _udp(host, port) as sock:
        sock.settimeout(2.0)
        sock.sendto(build_allocate(ticket), (relay_host, int(control_port)))
        relay_port = parse_allocated(sock.recv(2048), ticket)
        sock.sendto(build_bind(ticket), (relay_host, relay_port))
        cookie = parse_challenge(sock.recv(2048), ticket)
        sock.sendto(build_confirm(ticket, cookie), (relay_host, relay_port))
        parse_bound(sock.recv(2048), ticket)
    print(relay_port, flush=True)


def role_gen(host: str, dst: str, size: int, seconds: float) -> None:
    """Send type-4 datagrams of ``size`` bytes from ``host:5000`` for ``seconds``."""
    from relay.aio.batchio import BatchSocket

    dst_host, dst_port = dst.rsplit(":", 1)
    data = b"\x04\x00\x00\x00" + os.urandom(size - 4)
    with _udp(host, A_PORT) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        batch = BatchSocket(sock)
        items = [(data, (dst_host, int(dst_port)))] * 64
        sent, started = 0, time.perf_counter()
        print("go", flush=True)
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(16):
                done = batch.send_batch(items)
                sent += done
                if done < len(items):
                    select.select([], [sock], [], 0.01)
        took = time.perf_counter() - started
    print(json.dumps({"sent": sent, "seconds": took}), flush=True)


def role_forward(host: str, a: str, b: str) -> None:
    """The reference: ``:7000`` -> ``b:6000`` from ``:7001``, and back to ``a:5000``."""
    from relay.aio.batchio import BatchSocket
    from relay.aio.forwarding import tune_buffers

    socks = {REF_IN: _udp(host, REF_IN), REF_OUT: _udp(host, REF_OUT)}
    batches = {}
    for sock in socks.values():
        sock.setblocking(False)
        tune_buffers(sock, BUFFER)
        batches[sock.fileno()] = BatchSocket(sock)
    route = {
        socks[REF_IN].fileno(): (batches[socks[REF_OUT].fileno()], (b, B_PORT)),
        socks[REF_OUT].fileno(): (batches[socks[REF_IN].fileno()], (a, A_PORT)),
    }
    poller = select.epoll()
    for fd in route:
        poller.register(fd, select.EPOLLIN)
    print("forwarding", flush=True)
    while True:
        for fd, _ in poller.poll():
            out, dst = route[fd]
            while datagrams := batches[fd].recv_batch(64):
                out.send_batch([(data, dst) for data, _ in datagrams])


def role_echo(host: str) -> None:
    """Send every datagram back to where it came from."""
    with _udp(host, B_PORT) as sock:
        print("echoing", flush=True)
        while True:
            data, src = sock.recvfrom(2048)
            sock.sendto(data, src)


def role_rtt(host: str, targets: str, count: int) -> None:
    """Round trips (µs) of single 96-byte datagrams to each ``name=host:port``, interleaved."""
    pad = os.urandom(84)
    paths = {}
    for item in targets.split(","):
        name, _, addr = item.partition("=")
        h, p = addr.rsplit(":", 1)
        paths[name] = (h, int(p))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    lost = dict.fromkeys(paths, 0)
    with _udp(host, A_PORT) as sock:
        sock.settimeout(0.2)
        for i in range(count + 100):
            for index, (name, dst) in enumerate(paths.items()):
                data = b"\x04\x00\x00\x00" + struct.pack("!II", i, index) + pad
                started = time.perf_counter_ns()
                sock.sendto(data, dst)
                try:
                    while sock.recv(2048) != data:
                        pass
                except TimeoutError:
                    lost[name] += 1
                    continue
                if i >= 100:  # warm-up
                    samples[name].append((time.perf_counter_ns() - started) / 1000)
    print(json.dumps({"samples": samples, "lost": lost}), flush=True)


# --- the orchestration --------------------------------------------------------------------


@dataclass
class Paths:
    """Where the generator sends for each path (all on the relay host)."""

    relay_host: str
    ports: dict[str, int]
    pids: dict[str, int]  # the forwarding process of each path, for its CPU time

    def target(self, name: str) -> str:
        return f"{self.relay_host}:{self.ports[name]}"


def _me(role: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "benchmarks.relay", role, *(str(a) for a in args)]


def _pinned(cpu: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *cmd]


def run(seconds: float = 2.0, rounds: int = 5, samples: int = 3000) -> dict[str, float]:
    """Build the lab, measure, tear down; return the figures."""
    from lab.harness import Lab, lab_requirements

    if reason := lab_requirements():
        raise RuntimeError(reason)
    if (os.cpu_count() or 1) < 2:
        raise RuntimeError("needs two CPUs (generator and forwarder pinned apart)")
    with Lab() as lab:
        try:
            return _measure(lab, seconds, rounds, samples)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise


def _measure(lab: Any, seconds: float, rounds: int, samples: int) -> dict[str, float]:
    from lab.harness import INTERNET_GATEWAY, poll

    a, b, relay_ns = lab.add_host("a"), lab.add_host("b"), lab.internet
    ref = relay_ns.spawn(
        _pinned(FORWARD_CPU, _me("forward", INTERNET_GATEWAY, a.addr, b.addr)), name="ref"
    )
    poll(lambda: "forwarding" in ref.output(), timeout=20, what="reference forwarder")
    paths = Paths(INTERNET_GATEWAY, {"ref": REF_IN}, {"ref": ref.pid})
    for name in RELAYS:
        paths.ports[name], paths.pids[name] = _start_relay(lab, name, a, b)
    rps = Rps(relay_ns, f"{lab.prefix}-ap")
    b.run(["nft", "-f", "-"], input=_COUNTER_RULES)
    figures = _throughput(lab, a, b, paths, rps, seconds, rounds)
    figures.update(_relay_paths(relay_ns))
    b.run(["nft", "delete", *COUNTER.split()])
    rps.set(False)
    b.spawn(_pinned(GEN_CPU, _me("echo", b.addr)), name="echo")
    time.sleep(0.5)
    figures.update(_latency(a, b.addr, paths, samples))
    return figures


def _start_relay(lab: Any, name: str, a: Any, b: Any) -> tuple[int, int]:
    """Start one ``wiregate relay`` in the relay host and bind the pair: the port ``a``
    sends to, and the relay's process id."""
    from nacl.signing import SigningKey

    from lab.harness import INTERNET_GATEWAY, poll, wiregate_command
    from lab.relay_fixtures import node
    from relay.tickets import issue_pair

    control, relay_ports, stun, metrics, path = RELAYS[name]
    key = SigningKey.generate()
    signers = lab.workdir / f"signers-{name}.json"
    public = base64.b64encode(bytes(key.verify_key)).decode()
    signers.write_text(json.dumps({"signers": [{"public_key": public, "tenants": ["t"]}]}))
    # Far above the offered load (40 Gbit/s), yet within what an nftables byte limit
    # holds (the kernel refuses a rate plus burst beyond ~1.8e10 bytes/s).
    env = {"WIREGATE_BYTES_PER_SECOND": str(5 * 10**9), "WIREGATE_BURST_BYTES": str(10**8)}
    if path:
        env["WIREGATE_FORWARD_PATH"] = path
    proc = lab.internet.spawn(
        _pinned(FORWARD_CPU, [*wiregate_command(), "relay",
                              "--stun-listen", f"{INTERNET_GATEWAY}:{stun}",
                              "--relay-id", f"bench-{name}",
                              "--relay-listen", f"{INTERNET_GATEWAY}:{control}",
                              "--relay-ports", relay_ports,
                              "--verify-keys-file", str(signers),
                              "--metrics-listen", f"127.0.0.1:{metrics}"]),
        env=env,
        name=f"relay-{name}",
    )  # fmt: skip
    poll(lambda: "relay forwarding" in proc.output(), timeout=30, what=f"relay {name}")
    for_a, for_b = issue_pair(
        key, relay_id=f"bench-{name}", tenant="t", node_a=node("a"), node_b=node("b"),
        now=time.time(),
    )  # fmt: skip
    bound: list[int] = []
    for host, port, tkt in ((a, A_PORT, for_a), (b, B_PORT, for_b)):
        file = lab.workdir / f"ticket-{name}-{host.name}"
        file.write_text(tkt.hex())
        out = host.run(_me("bind", host.addr, port, f"{INTERNET_GATEWAY}:{control}", file))
        bound.append(int(out.stdout.split()[-1]))
    return bound[0], proc.pid


_COUNTER_RULES = f"""{COUNTER} {{
  counter rx {{ }}
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    udp dport {B_PORT} counter name "rx" drop
  }}
}}
"""


class Rps:
    """Receive packet steering of the relay host's ingress veth (from ``a``) onto CPU 1."""

    def __init__(self, ns: Any, ifname: str) -> None:
        self._ns, self._path = ns, f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"

    def set(self, on: bool) -> None:
        mask = "2" if on else "0"
        self._ns.run(["sh", "-c", f"echo {mask} > {self._path}"])


_SCRAPE = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"


def _relay_paths(ns: Any) -> dict[str, float]:
    """Which data path each relay used, and what it counted (printed for the record)."""
    figures: dict[str, float] = {}
    for name, (*_, metrics, _path) in RELAYS.items():
        text = ns.run([sys.executable, "-c", _SCRAPE, f"http://127.0.0.1:{metrics}/metrics"]).stdout
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(
                (
                    "wiregate_relay_forward_path",
                    "wiregate_relay_datagrams_total",
                    "wiregate_relay_kernel",
                )
            )
            and not line.rstrip().endswith(" 0.0")
        ]
        print(f"relay {name} metrics:\n  " + "\n  ".join(lines), file=sys.stderr)
        kernel = any(
            line.startswith('wiregate_relay_forward_path{path="kernel"} 1') for line in lines
        )
        figures[f"relay_{name}_kernel_path"] = 1.0 if kernel else 0.0
    return figures


def _count(b: Any) -> int:
    out = b.run(["nft", "-j", "list", "counter", *COUNTER.split()[1:], "rx"]).stdout
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise RuntimeError("no counter in nft output")


@dataclass
class Run:
    """One path at one size: rates and loss."""

    received_pps: float
    offered_pps: float
    loss: float
    cpu_us: float  # CPU time of the forwarding process per datagram received


def _one(a: Any, b: Any, paths: Paths, name: str, size: int, seconds: float) -> Run:
    from lab.harness import poll

    b.run(["nft", "reset", "counter", *COUNTER.split()[1:], "rx"])
    gen = a.spawn(
        _pinned(GEN_CPU, _me("gen", a.addr, paths.target(name), size, seconds)), name="gen"
    )
    poll(lambda: "go" in gen.output(), timeout=20, what="generator")
    cpu = _cpu_seconds(paths.pids[name])
    window = max(seconds - 1.0, seconds / 2)
    time.sleep((seconds - window) / 2)
    c1, t1 = _count(b), time.monotonic()
    time.sleep(window)
    c2, t2 = _count(b), time.monotonic()
    gen.wait(timeout=seconds + 30)
    report = json.loads(gen.output().strip().splitlines()[-1])
    total = _settled(b)
    cpu = _cpu_seconds(paths.pids[name]) - cpu
    return Run(
        received_pps=(c2 - c1) / (t2 - t1),
        offered_pps=report["sent"] / report["seconds"],
        loss=max(0.0, 1.0 - total / report["sent"]),
        cpu_us=cpu * 1e6 / max(total, 1),
    )


def _cpu_seconds(pid: int) -> float:
    """User and system time of ``pid`` so far (its softirq work on other CPUs not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settled(b: Any) -> int:
    """The counter once forwarders have drained their queues."""
    last = -1
    for _ in range(50):
        now = _count(b)
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return last


def _throughput(
    lab: Any, a: Any, b: Any, paths: Paths, rps: Rps, seconds: float, rounds: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    order = ["ref", "user", "default", "default_rps"]
    for label, size in SIZES.items():
        runs: dict[str, list[Run]] = {name: [] for name in order}
        for _ in range(rounds):
            for name in order:
                rps.set(name.endswith("_rps"))
                target = name.removesuffix("_rps")
                runs[name].append(_one(a, b, paths, target, size, seconds))
                print(f"relay {label} {name}: {runs[name][-1]}", file=sys.stderr)
            order.append(order.pop(0))
        figures.update(_summary(label, runs))
    return figures


def _summary(label: str, runs: dict[str, list[Run]]) -> dict[str, float]:
    def ratio(name: str) -> float:
        pairs = zip(runs[name], runs["ref"], strict=True)
        return round(statistics.median(r.received_pps / ref.received_pps for r, ref in pairs), 3)

    # The default relay in its best configuration of each round: with or without RPS.
    runs["best"] = [
        max(plain, steered, key=lambda r: r.received_pps)
        for plain, steered in zip(runs["default"], runs["default_rps"], strict=True)
    ]
    out = {f"relay_ratio_{label}": ratio("best"), f"relay_user_ratio_{label}": ratio("user")}
    pairs = zip(runs["user"], runs["ref"], strict=True)
    out[f"relay_user_cpu_ratio_{label}"] = round(
        statistics.median(r.cpu_us / max(ref.cpu_us, 1e-9) for r, ref in pairs), 3
    )
    for key in ("ref", "user", "default", "default_rps"):
        done = runs[key]
        out[f"relay_{key}_{label}_pps"] = round(statistics.median(r.received_pps for r in done))
        out[f"relay_{key}_{label}_loss"] = round(statistics.median(r.loss for r in done), 4)
        out[f"relay_{key}_{label}_offered_pps"] = round(
            statistics.median(r.offered_pps for r in done)
        )
        out[f"relay_{key}_{label}_cpu_us"] = round(statistics.median(r.cpu_us for r in done), 3)
    return out


def _latency(a: Any, b_addr: str, paths: Paths, samples: int) -> dict[str, float]:
    targets = {"direct": f"{b_addr}:{B_PORT}"} | {n: paths.target(n) for n in paths.ports}
    spec = ",".join(f"{n}={t}" for n, t in targets.items())
    out = a.run(_pinned(GEN_CPU, _me("rtt", a.addr, spec, samples)), timeout=600).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    rtts: dict[str, list[float]] = doc["samples"]
    print(f"relay rtt lost: {doc['lost']}", file=sys.stderr)
    base = statistics.median(rtts["direct"])
    p99 = {name: _p99(values) for name, values in rtts.items()}

    def added(name: str) -> float:
        return max(p99[name] - base, 1e-3)

    figures = {f"relay_{name}_p99_rtt_us": round(v, 1) for name, v in p99.items()}
    figures["relay_direct_p50_rtt_us"] = round(base, 1)
    figures["relay_p99_latency_ratio"] = round(added("default") / added("ref"), 3)
    figures["relay_user_p99_latency_ratio"] = round(added("user") / added("ref"), 3)
    return figures


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


ROLES: dict[str, Callable[..., None]] = {
    "bind": lambda host, port, control, ticket: role_bind(host, int(port), control, ticket),
    "gen": lambda host, dst, size, secs: role_gen(host, dst, int(size), float(secs)),
    "forward": role_forward,
    "echo": role_echo,
    "rtt": lambda host, targets, count: role_rtt(host, targets, int(count)),
}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description="relay forwarding rate and latency")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="paths alternate in each")
    parser.add_argument("--samples", type=int, default=3000, help="round trips per path")
    parser.add_argument("--quick", action="store_true", help="1 round of 1.5 s, 500 samples")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.samples = 1.5, 1, 500
    try:
        figures = run(args.seconds, args.rounds, args.samples)
    except Exception as exc:
        print(f"relay benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

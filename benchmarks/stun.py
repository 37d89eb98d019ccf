"""STUN Binding responses per second: ``wiregate relay`` against coturn, same client, same run.

Servers, all on loopback of this machine:

- ``wiregate relay`` (the real process) with its STUN rate limits set far above the
  offered load, so the figure is its capacity;
- coturn (``turnserver --stun-only``, Debian's ``coturn``), its default thread per core;
- ``wiregate relay`` with its default limits, for the figure a fleet actually gets.

The client is one process driving 256 UDP sockets, each bound to its own loopback
address (127.1.0.1 ...), so the server sees 256 sources. Each socket keeps a window
of plain 20-byte RFC 8489 Binding requests in flight (``sendmmsg``/``recvmmsg``):
every answer received is replaced by a new request, and a socket whose answers
stopped coming (a lost datagram) gets its window back after 50 ms. Replies are
counted at the client; one answer of each server is checked to be a Binding
success whose XOR-MAPPED-ADDRESS is the client socket. Rounds alternate between
wiregate and coturn so noise on the machine hits both alike; figures are medians.

``python -m benchmarks.stun`` prints one JSON object (last line):

- ``stun_per_s``, ``coturn_per_s``: median replies per second of each;
- ``stun_vs_coturn``: the median over rounds of wiregate / coturn, each round
  measuring both back to back (target >= 1.0);
- ``stun_default_limits_per_s``: wiregate with its default limits, after a warm-up
  that spends the buckets' bursts (the sustained rate a fleet of 256 sources gets);
- ``stun_client_cpu``: the client's CPU share during the wiregate rounds (near 1.0:
  the client, not the server, may be what limits the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from lab.harness import poll, wiregate_command
from relay.aio.batchio import BatchSocket
from relay.client.stun import parse_binding_response

__all__ = ["run"]

Addr = tuple[str, int]
TXID = bytes(range(12))
REQUEST = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + TXID  # a plain RFC 8489 Binding request
HIGH_LIMITS = {
    "WIREGATE_STUN_RATE": "10000000",
    "WIREGATE_STUN_BURST": "10000000",
    "WIREGATE_STUN_GLOBAL_RATE": "10000000",
    "WIREGATE_STUN_GLOBAL_BURST": "10000000",
}
STALE = 0.05  # s without an answer: the socket's window is presumed lost and refilled
DEFAULT_WARMUP = 8.0  # s: long enough to spend the default buckets' bursts at this load


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(cmd: list[str], ready: str, env: dict[str, str], log: Path) -> Iterator[int]:
    """Run ``cmd`` until the block ends; yields its pid once ``ready`` is in its output."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)  # fmt: skip
    try:
        poll(lambda: ready in log.read_text(errors="replace") or proc.poll() is not None,
             timeout=30, what=f"{cmd[0]} to start")  # fmt: skip
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wiregate(port: int, log: Path, *, limits: dict[str, str]) -> AbstractContextManager[int]:
    cmd = [*wiregate_command(), "relay", "--stun-listen", f"127.0.0.1:{port}",
           "--metrics-listen", "", "--log-format", "json"]  # fmt: skip
    return server(cmd, "relay listening", {**limits, "WIREGATE_LOG_LEVEL": "info"}, log)


def coturn(port: int, log: Path) -> AbstractContextManager[int]:
    cmd = ["turnserver", "--stun-only", "-n", "--no-tls", "--no-dtls", "--no-cli",
           "-L", "127.0.0.1", "-p", str(port), "--log-file", "stdout"]  # fmt: skip
    return server(cmd, "Total General servers", {}, log)


class Client:
    """``sources`` sockets, each on its own loopback address, ``window`` requests in flight."""

    def __init__(self, sources: int, window: int) -> None:
        self.window = window
        self.socks = []
        for i in range(sources):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.1.{(i + 1) // 256}.{(i + 1) % 256}", 0))
            sock.setblocking(False)
            self.socks.append(sock)
        self.io = [BatchSocket(s, bufsize=2048) for s in self.socks]
        self.poller = select.epoll()
        self.index = {s.fileno(): i for i, s in enumerate(self.socks)}
        for sock in self.socks:
            self.poller.register(sock.fileno(), select.EPOLLIN)

    def close(self) -> None:
        self.poller.close()
        for sock in self.socks:
            sock.close()

    def check(self, target: Addr) -> None:
        """One request, one answer: a Binding success naming the client's socket."""
        sock, io = self.socks[0], self.io[0]
        io.send_batch([(REQUEST, target)])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for data, _ in io.recv_batch(8):
                answer = parse_binding_response(data, TXID)
                if answer.mapped != sock.getsockname():
                    raise RuntimeError(f"{target} answered {answer.mapped}")
                self.drain()
                return
            time.sleep(0.01)
        raise RuntimeError(f"no STUN answer from {target}")

    def drain(self) -> None:
        time.sleep(0.1)
        for io in self.io:
            while io.recv_batch(64):
                pass

    def run(self, target: Addr, seconds: float, warmup: float) -> float:
        """Replies per second received from ``target`` over ``seconds`` after ``warmup``."""
        window, io, index = self.window, self.io, self.index
        inflight = [0] * len(io)
        heard = [time.monotonic()] * len(io)
        batch = [(REQUEST, target)] * window
        for i, sock in enumerate(io):
            inflight[i] += sock.send_batch(batch)
        start = time.monotonic()
        begin, end = start + warmup, start + warmup + seconds
        counted, sweep = 0, start + STALE
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for fd, _ in self.poller.poll(0.01):
                i = index[fd]
                got = 0
                while True:
                    n = len(io[i].recv_batch(64))
                    if not n:
                        break
                    got += n
                inflight[i] = max(0, inflight[i] - got)
                heard[i] = now
                if now >= begin:
                    counted += got
                if inflight[i] <= window // 2:
                    inflight[i] += io[i].send_batch(batch[: window - inflight[i]])
            if now >= sweep:
                sweep = now + STALE
                for i, last in enumerate(heard):
                    if now - last > STALE:
                        heard[i], inflight[i] = now, io[i].send_batch(batch)
        self.drain()
        return counted / seconds


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of ``pid`` (all its threads)."""
    if pid is None:
        usage = os.times()
        return usage.user + usage.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    rounds: int, seconds: float, sources: int, window: int, workdir: Path
) -> dict[str, float | str]:
    if shutil.which("turnserver") is None:
        return {"skipped": "turnserver (Debian package coturn) is not installed"}
    ports = {name: free_port() for name in ("wiregate", "coturn", "default")}
    client = Client(sources, window)
    ours: list[float] = []
    theirs: list[float] = []
    ratios: list[float] = []
    client_cpu: list[float] = []
    server_cpu: list[float] = []
    coturn_cpu: list[float] = []
    try:
        with (
            wiregate(ports["wiregate"], workdir / "wiregate.log", limits=HIGH_LIMITS) as wpid,
            coturn(ports["coturn"], workdir / "coturn.log") as cpid,
        ):
            w, c = ("127.0.0.1", ports["wiregate"]), ("127.0.0.1", ports["coturn"])
            client.check(w)
            client.check(c)
            for _ in range(rounds):
                wall, cpu, scpu = time.monotonic(), cpu_seconds(), cpu_seconds(wpid)
                a = client.run(w, seconds, warmup=0.5)
                took = time.monotonic() - wall
                client_cpu.append((cpu_seconds() - cpu) / took)
                server_cpu.append((cpu_seconds(wpid) - scpu) / took)
                wall, ccpu = time.monotonic(), cpu_seconds(cpid)
                b = client.run(c, seconds, warmup=0.5)
                coturn_cpu.append((cpu_seconds(cpid) - ccpu) / (time.monotonic() - wall))
                ours.append(a)
                theirs.append(b)
                ratios.append(a / b if b else 0.0)
                print(f"round: wiregate {a:.0f}/s (cpu {server_cpu[-1]:.2f}) "
                      f"coturn {b:.0f}/s (cpu {coturn_cpu[-1]:.2f})", file=sys.stderr)  # fmt: skip
        with wiregate(ports["default"], workdir / "default.log", limits={}):
            d = ("127.0.0.1", ports["default"])
            client.check(d)
            # the global burst (2 s of its rate) spent first: the sustained rate is reported
            default = client.run(d, seconds, warmup=DEFAULT_WARMUP)
            print(f"default limits: {default:.0f}/s", file=sys.stderr)
    finally:
        client.close()
    return {
        "stun_per_s": round(statistics.median(ours)),
        "coturn_per_s": round(statistics.median(theirs)),
        "stun_vs_coturn": round(statistics.median(ratios), 3),
        "stun_default_limits_per_s": round(default),
        "stun_client_cpu": round(statistics.median(client_cpu), 2),
        "stun_server_cpu": round(statistics.median(server_cpu), 2),
        "coturn_server_cpu": round(statistics.median(coturn_cpu), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="STUN Binding responses/s: wiregate vs coturn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sources", type=int, default=256)
    parser.add_argument("--window", type=int, default=8, help="requests in flight per source")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wiregate-bench-stun-") as tmp:
        figures = run(args.rounds, args.seconds, args.sources, args.window, Path(tmp))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

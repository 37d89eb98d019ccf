"""End-to-end fan-out through the real gateway process, over real WebSockets (127.0.0.1).

Starts ``wiregate gateway`` as a subprocess (embedded SQLite in a temporary state
directory, admin unix socket there too) and waits for ``/readyz``. Through the
admin socket it creates one reusable enrollment key, then enrolls N devices over
REST (``POST /api/v1/enroll``, real X25519 public keys, bounded concurrency).
This process then opens one map stream per device (``GET /api/v1/stream`` with
the device token) and waits until every agent holds its full map.

Each of K changes is the real path: one agent sends ``{"type": "endpoints", ...}``
on its own stream, the gateway validates it, writes it to the store (bumping
``map_version``) and the broker fans the delta out to the N - 1 other agents.
A change is timed from the send until the last of those agents has received a
delta carrying the new endpoint (``time.monotonic`` in this one process). Changes
run one after another, never overlapping.

Figures:

* ``fanout_p99_s`` / ``fanout_p50_s``: per change, send → last affected agent has it
  (nearest rank over the K changes: with K = 20 the p99 is the worst change);
* ``fanout_agent_p99_s``: over every (change, agent) receipt;
* ``fanout_server_write_mean_s``: gateway side, broker change → delta written to the
  socket, mean (from its ``wiregate_broker_fanout_seconds`` histogram);
* ``fanout_enroll_per_s``: REST enrollments per second (SQLite, ``synchronous=FULL``);
* ``fanout_connect_s``: all agents connected with their full maps;
* ``fanout_rss_kb_per_agent``: gateway VmRSS after every agent is connected (and a
  1 s settle) minus before connecting, per agent; it includes heap the allocator
  kept from the full maps in flight;
* ``fanout_rss_end_kb_per_agent``: the same, measured after the K changes;
* ``fanout_agents``: N.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.common import emit, raise_nofile, vmrss_kb
from wiregate.keys import encode_key, generate_private_key, public_from_private

AGENTS = 1000
CHANGES = 20
ENROLL_CONCURRENCY = 16
CONNECT_CONCURRENCY = 64
READY_TIMEOUT_S = 30.0
CHANGE_TIMEOUT_S = 10.0
CHANGE_GAP_S = 0.2
DEADLINE_S = 150.0
ROOT = Path(__file__).resolve().parent.parent
WIREGATE = ROOT / ".venv" / "bin" / "wiregate"


@dataclass
class Gateway:
    """A running ``wiregate gateway`` process and where to reach it."""

    proc: subprocess.Popen[bytes]
    base: str
    metrics: str
    admin_socket: Path
    log: Path

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


@dataclass
class Enrolled:
    device_id: str
    token: str


@dataclass
class Agents:
    """N map streams; records when each agent first saw each awaited endpoint."""

    n: int
    fulls: int = 0
    all_full: asyncio.Event = field(default_factory=asyncio.Event)
    awaited: dict[str, list[float]] = field(default_factory=dict)  # endpoint -> receipt times
    streams: dict[str, aiohttp.ClientWebSocketResponse] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    async def agent(
        self, session: aiohttp.ClientSession, url: str, dev: Enrolled, gate: asyncio.Semaphore
    ) -> None:
        headers = {"Authorization": f"Bearer {dev.token}"}
        async with gate:
            ws = await session.ws_connect(url, headers=headers, max_msg_size=0, autoping=True)
        self.streams[dev.device_id] = ws
        async with ws:
            async for msg in ws:
                now = time.monotonic()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                self.receive(dev.device_id, msg.data, now)
        if not ws.closed or ws.close_code not in (None, 1000, 1012):
            self.errors.append(f"{dev.device_id}: stream closed ({ws.close_code})")

    def receive(self, device_id: str, text: str, now: float) -> None:
        if text.startswith('{"type":"delta"'):
            for peer in json.loads(text)["upsert"]:
                for endpoint in peer["endpoints"]:
                    times = self.awaited.get(endpoint)
                    if times is not None:
                        times.append(now)
        elif text.startswith('{"type":"full"'):
            peers = text.count('"allowed_ips"')  # only PEER objects carry allowed_ips
            if peers != self.n - 1:
                self.errors.append(f"{device_id}: full map with {peers} peers")
            self.fulls += 1
            if self.fulls == self.n:
                self.all_full.set()
        else:
            self.errors.append(f"{device_id}: unexpected {text[:80]!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_command() -> list[str]:
    """This checkout's ``wiregate``: its virtualenv's entry point, else this interpreter
    with the checkout first on its path (a git worktree has no virtualenv of its own)."""
    if WIREGATE.exists():
        return [str(WIREGATE)]
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from wiregate.cli.main import main; main()"
    )
    return [sys.executable, "-c", code]


def start_gateway(tmp: Path, database_url: str | None = None) -> Gateway:
    """``wiregate gateway`` with its files in ``tmp`` (SQLite there unless ``database_url``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port, mport = free_port(), free_port()
    log = tmp / "gateway.log"
    cmd = [
        *gateway_command(), "gateway",
        "--listen", f"127.0.0.1:{port}",
        "--metrics-listen", f"127.0.0.1:{mport}",
        "--state-dir", str(tmp / "state"),
        "--admin-socket", str(tmp / "gw.sock"),
        "--log-level", "warning",
        *(["--database-url", database_url] if database_url else []),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp
        )
    base, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}"
    return Gateway(proc, base, metrics, tmp / "gw.sock", log)


def client_session() -> aiohttp.ClientSession:
    """A session for many agents' streams: no connection limit, no total timeout."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)


async def wait_ready(gw: Gateway, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited ({gw.proc.returncode}):\n{gw.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{gw.base}/readyz") as resp:
                if resp.status == 200 and gw.admin_socket.exists():
                    return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"gateway not ready after {READY_TIMEOUT_S:.0f}s:\n{gw.log_tail()}")


async def create_key(gw: Gateway, tags: Sequence[str] = ()) -> str:
    """A reusable enrollment key, created through the trusted admin socket."""
    body = {"tags": list(tags), "expiry": 3600, "reusable": True, "ephemeral": False,
            "description": "bench"}  # fmt: skip
    connector = aiohttp.UnixConnector(path=str(gw.admin_socket))
    async with (
        aiohttp.ClientSession(connector=connector) as admin,
        admin.post("http://gateway/api/v1/keys", json=body) as resp,
    ):
        if resp.status != 201:
            raise RuntimeError(f"key creation: {resp.status} {await resp.text()}")
        return str((await resp.json())["secret"])


async def enroll_all(
    gw: Gateway, session: aiohttp.ClientSession, secret: str, n: int, first: int = 0
) -> list[Enrolled]:
    """``n`` devices enrolled with ``secret``, named ``bench-NNNN`` from ``first``."""
    keys = [encode_key(public_from_private(generate_private_key())) for _ in range(n)]

    async def enroll(j: int) -> Enrolled:
        i = first + j
        body = {
            "auth_key": secret,
            "public_key": keys[j],
            "name": f"bench-{i:04d}",
            "endpoints": [f"203.0.113.{i % 254 + 1}:{40000 + i}"],
        }
        async with session.post(f"{gw.base}/api/v1/enroll", json=body) as resp:
            if resp.status != 201:
                raise RuntimeError(f"enroll {i}: {resp.status} {await resp.text()}")
            doc = await resp.json()
        return Enrolled(doc["device"]["id"], doc["token"])

    gate = asyncio.Semaphore(ENROLL_CONCURRENCY)

    async def bounded(i: int) -> Enrolled:
        async with gate:
            return await enroll(i)

    return list(await asyncio.gather(*(bounded(i) for i in range(n))))


async def fanout_histogram(gw: Gateway, session: aiohttp.ClientSession) -> tuple[float, float]:
    """(count, sum) of the gateway's ``wiregate_broker_fanout_seconds`` histogram."""
    async with session.get(f"{gw.metrics}/metrics") as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("wiregate_broker_fanout_seconds_count", "wiregate_broker_fanout_seconds_sum"):
            values[name] = float(value)
    return values["wiregate_broker_fanout_seconds_count"], values[
        "wiregate_broker_fanout_seconds_sum"
    ]


async def wait_for_count(times: list[float], count: int, agents: Agents, what: str) -> None:
    deadline = time.monotonic() + CHANGE_TIMEOUT_S
    while len(times) < count:
        if time.monotonic() > deadline or agents.errors:
            errors = "; ".join(agents.errors[:5])
            raise TimeoutError(f"{what}: only {len(times)}/{count} agents got it; {errors}")
        await asyncio.sleep(0.001)


async def drive(gw: Gateway, n: int, k: int) -> dict[str, float]:
    async with client_session() as session:
        await wait_ready(gw, session)
        secret = await create_key(gw)
        started = time.monotonic()
        devices = await enroll_all(gw, session, secret, n)
        enroll_s = time.monotonic() - started

        agents = Agents(n)
        rss_before = vmrss_kb(gw.proc.pid)
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        url = f"{gw.base}/api/v1/stream"
        started = time.monotonic()
        tasks = [asyncio.create_task(agents.agent(session, url, d, gate)) for d in devices]
        try:
            full = asyncio.create_task(agents.all_full.wait())
            done, _ = await asyncio.wait([full, *tasks], timeout=60, return_when="FIRST_COMPLETED")
            if full not in done:
                full.cancel()
                raise RuntimeError(f"{agents.fulls}/{n} full maps; {'; '.join(agents.errors[:5])}")
            connect_s = time.monotonic() - started
            await asyncio.sleep(1.0)
            rss_connected = vmrss_kb(gw.proc.pid)

            count0, sum0 = await fanout_histogram(gw, session)
            per_change, per_agent = await timed_changes(agents, devices, k)
            count1, sum1 = await fanout_histogram(gw, session)
            rss_end = vmrss_kb(gw.proc.pid)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "fanout_p99_s": percentile(per_change, 99),
        "fanout_p50_s": statistics.median(per_change),
        "fanout_agent_p99_s": percentile(per_agent, 99),
        "fanout_server_write_mean_s": (sum1 - sum0) / max(1.0, count1 - count0),
        "fanout_enroll_per_s": n / enroll_s,
        "fanout_connect_s": connect_s,
        "fanout_rss_kb_per_agent": (rss_connected - rss_before) / n,
        "fanout_rss_end_kb_per_agent": (rss_end - rss_before) / n,
        "fanout_agents": n,
    }


async def timed_changes(
    agents: Agents, devices: list[Enrolled], k: int, first: int = 0
) -> tuple[list[float], list[float]]:
    """``k`` endpoint changes, one after another, each sent by one agent on its stream;
    per change, the time until the last other agent had it, and every receipt's time."""
    n = len(devices)
    per_change: list[float] = []
    per_agent: list[float] = []
    for j in range(first, first + k):
        sender = devices[(j * 37) % n].device_id
        endpoint = f"198.51.100.{j % 250 + 1}:{51820 + j}"
        times = agents.awaited[endpoint] = []
        message = json.dumps({"type": "endpoints", "endpoints": [endpoint]})
        t0 = time.monotonic()
        await agents.streams[sender].send_str(message)
        await wait_for_count(times, n - 1, agents, f"change {j} by {sender}")
        latencies = [t - t0 for t in times]
        per_change.append(max(latencies))
        per_agent.extend(latencies)
        await asyncio.sleep(CHANGE_GAP_S)
    return per_change, per_agent


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def with_gateway(
    prefix: str,
    drive: Callable[[Gateway], Awaitable[dict[str, float]]],
    deadline: float = DEADLINE_S,
) -> dict[str, float]:
    """Start a gateway in a fresh directory, run ``drive`` against it (``DEADLINE_S``),
    stop it and clean up; a failure carries the gateway's log tail."""
    raise_nofile()  # this process holds many client sockets; the gateway inherits the limit
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        gw = start_gateway(tmp)
        try:
            return asyncio.run(asyncio.wait_for(drive(gw), deadline))
        except BaseException as exc:
            tail = gw.log_tail()
            if tail:
                exc.add_note(f"gateway log:\n{tail}")
            raise
        finally:
            stop_gateway(gw.proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(n: int = AGENTS, k: int = CHANGES) -> dict[str, float]:
    """Start a gateway, enroll and connect ``n`` agents, time ``k`` changes, clean up."""
    return with_gateway("wiregate-fanout-", lambda gw: drive(gw, n, k))


if __name__ == "__main__":
    emit(run())

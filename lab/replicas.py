"""Gateway replicas in the lab: several ``wiregate gateway`` processes in the internet
namespace on one real PostgreSQL (Debian's, started in that namespace), and helpers
that read what the processes logged (their own timestamps, free of polling delay).
Used by tests/e2e/test_replicas.py and benchmarks/failover.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lab.harness import INTERNET_GATEWAY, Agent, Lab, LabError, Process, Wiregate, poll
from lab.pg import PgServer

__all__ = ["PORTS", "Replicas", "connected_to", "logged_at", "replicas_on", "resumed_on"]

PORTS = (8080, 8081)


@dataclass
class Replicas:
    """Two gateway processes on one database, reached by agents as ``A,B``."""

    lab: Lab
    pg: PgServer
    url: str
    wiregate: Wiregate
    procs: dict[int, Process]

    def server(self, port: int) -> str:
        return f"http://{INTERNET_GATEWAY}:{port}"

    def start(self, port: int) -> Process:
        root = self.lab.workdir / f"gateway-{port}"
        root.mkdir(parents=True, exist_ok=True)
        proc = self.lab.internet.spawn(
            [*self.wiregate.cmd, "gateway", "--listen", f"{INTERNET_GATEWAY}:{port}",
             "--metrics-listen", f"{INTERNET_GATEWAY}:{port + 1000}",
             "--state-dir", str(root), "--admin-socket", str(self.socket(port)),
             "--database-url", self.url],
            name=f"gateway-{port}",
        )  # fmt: skip
        self.procs[port] = proc
        poll(lambda: self.ready(port), timeout=60, what=f"replica {port} /readyz")
        return proc

    def socket(self, port: int) -> Path:
        return self.lab.workdir / f"gateway-{port}" / "gw.sock"

    def ready(self, port: int) -> bool:
        proc = self.procs[port]
        if not proc.alive():
            raise LabError(f"replica {port} exited {proc.returncode}:\n{proc.output(3000)}")
        probe = self.lab.internet.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
             f"{self.server(port)}/readyz"], check=False, timeout=10,
        )  # fmt: skip
        return probe.stdout.strip() == "200"

    def use(self, port: int) -> None:
        """Admin commands and new agents go to replica ``port`` first."""
        self.wiregate.admin_socket = self.socket(port)
        other = PORTS[1 - PORTS.index(port)]
        self.wiregate.server = f"{self.server(port)},{self.server(other)}"


def logged_at(proc: Process, event: str, after: float, **fields: Any) -> float | None:
    """Wall-clock time of the first JSON log line of ``proc`` with ``event`` and ``fields``
    at or after ``after`` (the process's own timestamps: no polling delay in figures)."""
    for line in proc.output().splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") != event or any(doc.get(k) != v for k, v in fields.items()):
            continue
        at = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
        if at >= after:
            return at
    return None


def resumed_on(reps: Replicas, port: int, device_ids: dict[str, str], since: float,
               timeout: float = 20.0) -> dict[str, float]:  # fmt: skip
    """Seconds from ``since`` until each device's stream opened on replica ``port``
    (:class:`TimeoutError` if not all within ``timeout`` seconds)."""
    found: dict[str, float] = {}

    def all_opened() -> bool:
        for name, device_id in device_ids.items():
            at = logged_at(reps.procs[port], "stream_open", since, device_id=device_id)
            if at is not None:
                found[name] = at - since
        return len(found) == len(device_ids)

    poll(all_opened, timeout=timeout, interval=0.1, what=f"streams to resume on replica {port}")
    return found


def connected_to(wiregate: Wiregate, agent: Agent) -> str | None:
    gateway: dict[str, Any] = wiregate.status(agent)["gateway"]
    return str(gateway["server"]) if gateway["connected"] else None


@contextmanager
def replicas_on(lab: Lab) -> Iterator[Replicas]:
    """PostgreSQL and one replica per port of :data:`PORTS`, all stopped afterwards."""
    pg = PgServer(host=INTERNET_GATEWAY, wrap=lab.internet._wrap).start()
    try:
        url = pg.create_database()
        reps = Replicas(lab, pg, url, Wiregate(lab), {})
        for port in PORTS:
            reps.start(port)
        yield reps
        for proc in reps.procs.values():  # before their database goes
            proc.stop()
    finally:
        pg.destroy()

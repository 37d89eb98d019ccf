"""Enrollment through the real gateway process with token validation, against a bare insert.

Starts ``wiregate gateway`` as a subprocess (embedded SQLite, ``synchronous=FULL``) with
one trusted workload issuer, served by this process on 127.0.0.1 (discovery and JWKS,
RS256). Every enrollment is the real path: ``POST /api/v1/enroll`` with a
``workload_token`` (a distinct workload identity each), verified by the gateway against
its cached JWKS, a device written with its address, audit record and map change, and
the answer sent back. Tokens are signed before the clock starts; N enrollments run
with ``CONCURRENCY`` in flight.

In the same run, the floor: the same number of single-row durable commits (one row of
a device's size per transaction, the gateway's own engine and pragmas, one at a time).

Figures:

* ``enroll_per_s``: enrollments per second (N / wall time);
* ``enroll_p99_ms`` / ``enroll_p50_ms``: request latency, nearest rank;
* ``enroll_bare_insert_per_s``: the single-row commits per second;
* ``enroll_vs_bare_insert``: ``enroll_bare_insert_per_s / enroll_per_s`` (how many bare
  durable commits one enrollment costs; lower is better);
* ``enroll_gateway_cpu_ms``: the gateway process's CPU time (user + system) per
  enrollment: what the rate would be with a core to itself (a machine loaded by other
  work slows the rate, not this);
* ``enroll_n``: N.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
from aiohttp import web
from sqlalchemy import Column, Float, MetaData, String, Table

from benchmarks.common import emit, raise_nofile
from benchmarks.fanout import (
    WIREGATE,
    Gateway,
    free_port,
    percentile,
    stop_gateway,
    wait_ready,
)
from gateway.store.engine import create_engine
from lab.tokenkit import idp_app, public_jwk, rsa_key
from wiregate.keys import encode_key, generate_private_key, public_from_private

N = 600
CONCURRENCY = 16
AUDIENCE = "wiregate-bench"
DEADLINE_S = 120.0


def gateway_config(tmp: Path, issuer: str, port: int, mport: int) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(f"""
[gateway]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{mport}"
state_dir = "{tmp / "state"}"
admin_socket = "{tmp / "gw.sock"}"
log_level = "warning"

[[gateway.workload_issuers]]
name = "bench"
issuer = "{issuer}"
audience = "{AUDIENCE}"
insecure_http = true
""")
    return path


def start(tmp: Path, issuer: str) -> Gateway:
    port, mport = free_port(), free_port()
    log = tmp / "gateway.log"
    cmd = [str(WIREGATE), "gateway", "--config", str(gateway_config(tmp, issuer, port, mport))]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp
        )
    return Gateway(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}",
                   tmp / "gw.sock", log)  # fmt: skip


def mint(issuer: str, n: int) -> list[str]:
    key, now = rsa_key(), int(time.time())
    return [
        jwt.encode({"iss": issuer, "sub": f"workload-{i:05d}", "aud": AUDIENCE, "iat": now,
                    "exp": now + 600}, key, algorithm="RS256", headers={"kid": "k1"})
        for i in range(n)
    ]  # fmt: skip


async def enroll_all(gw: Gateway, tokens: list[str]) -> tuple[float, float, list[float]]:
    """Wall seconds and the gateway's CPU seconds for all but the first, and latencies."""
    keys = [encode_key(public_from_private(generate_private_key())) for _ in tokens]
    gate = asyncio.Semaphore(CONCURRENCY)
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(gw, session)

        async def one(i: int) -> None:
            body = {"workload_token": tokens[i], "public_key": keys[i], "name": f"w-{i:05d}"}
            async with gate:
                t0 = time.perf_counter()
                async with session.post(f"{gw.base}/api/v1/enroll", json=body) as resp:
                    if resp.status != 201:
                        raise RuntimeError(f"enroll {i}: {resp.status} {await resp.text()}")
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        await one(0)  # the first fetches discovery and JWKS: not timed with the rest
        latencies.clear()
        started, cpu = time.perf_counter(), cpu_seconds(gw.proc.pid)
        await asyncio.gather(*(one(i) for i in range(1, len(tokens))))
        took = time.perf_counter() - started
        return took, cpu_seconds(gw.proc.pid) - cpu, latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bare_inserts(tmp: Path, n: int) -> float:
    """Seconds for ``n`` single-row durable commits through the gateway's engine."""
    table = Table("bare", MetaData(), Column("id", String(32), primary_key=True),
                  Column("public_key", String(44)), Column("name", String(255)),
                  Column("created_at", Float))  # fmt: skip
    engine = create_engine(f"sqlite+aiosqlite:///{tmp / 'bare.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        started = time.perf_counter()
        for i in range(n):
            async with engine.begin() as conn:
                await conn.execute(table.insert().values(
                    id=f"dev_{i:028x}", public_key="k" * 44, name=f"w-{i:05d}",
                    created_at=time.time()))  # fmt: skip
        return time.perf_counter() - started
    finally:
        await engine.dispose()


async def serve_issuer() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(idp_app([public_jwk(rsa_key(), "k1", use="sig")]))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def drive(tmp: Path, n: int) -> dict[str, float]:
    runner, issuer = await serve_issuer()
    try:
        tokens = mint(issuer, n + 1)
        gw = start(tmp, issuer)
        try:
            took, cpu, latencies = await enroll_all(gw, tokens)
        except BaseException as exc:
            exc.add_note(f"gateway log:\n{gw.log_tail()}")
            raise
        finally:
            stop_gateway(gw.proc)
    finally:
        await runner.cleanup()
    bare = await bare_inserts(tmp, n)
    rate, bare_rate = n / took, n / bare
    return {
        "enroll_per_s": rate,
        "enroll_p99_ms": percentile(latencies, 99) * 1000,
        "enroll_p50_ms": percentile(latencies, 50) * 1000,
        "enroll_bare_insert_per_s": bare_rate,
        "enroll_vs_bare_insert": bare_rate / rate,
        "enroll_gateway_cpu_ms": cpu / n * 1000,
        "enroll_n": n,
    }


def run(n: int = N) -> dict[str, float]:
    """Enroll ``n`` workloads through a fresh gateway, then time ``n`` bare inserts."""
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="wiregate-enroll-"))
    try:
        return asyncio.run(asyncio.wait_for(drive(tmp, n), DEADLINE_S))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=N, help="enrollments (and bare inserts)")
    emit(run(parser.parse_args().n))

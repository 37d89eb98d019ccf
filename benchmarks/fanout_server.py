"""A standalone map-stream server for the fan-out benchmark (127.0.0.1 only).

``python -m benchmarks.fanout_server --devices N`` hosts a :class:`Broker`
loaded with N devices (allow-all) and prints ``READY <port>`` on stdout. Routes:

* ``GET /stream/{device_id}?since=V``: the agent map stream;
* ``POST /change/{device_id}``: move the device's endpoint, bump the version,
  ``broker.upsert``; answers ``{"version": V}``;
* ``GET /stats``: connected agents, version, deltas written and their summed latency;
* ``POST /trim``: ``gc.collect()`` + ``malloc_trim(0)``, to tell retained from transient memory.

It exits by itself after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import socket
from dataclasses import replace

from aiohttp import web

from benchmarks.common import fleet, raise_nofile
from gateway.broker import FANOUT_SECONDS, Broker

BROKER = web.AppKey("broker", Broker)


async def stream(request: web.Request) -> web.StreamResponse:
    since = request.query.get("since")

    async def on_endpoints(device_id: str, endpoints: list[str]) -> None:
        return None

    broker = request.app[BROKER]
    device_id = request.match_info["device_id"]
    return await broker.serve(request, device_id, int(since) if since else None, on_endpoints)


async def change(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    device = broker.device(request.match_info["device_id"])
    version = broker.version + 1
    moved = replace(device, endpoints=(f"203.0.113.{version % 250}:{1024 + version}",))
    broker.upsert(moved, version)
    return web.json_response({"version": version})


async def stats(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    count, total = _histogram_count_sum()
    body: dict[str, float] = {"connected": broker.connected, "version": broker.version}
    body |= {"deltas_written": count, "fanout_seconds_sum": total}
    return web.json_response(body)


def _histogram_count_sum() -> tuple[float, float]:
    count = total = 0.0
    for metric in FANOUT_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


async def trim(request: web.Request) -> web.Response:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return web.json_response({})


def make_app(devices: int) -> web.Application:
    broker = Broker()
    broker.load(fleet(devices, grouped=False), version=1)
    app = web.Application()
    app[BROKER] = broker
    app.router.add_get("/stream/{device_id}", stream)
    app.router.add_post("/change/{device_id}", change)
    app.router.add_get("/stats", stats)
    app.router.add_post("/trim", trim)

    async def shutdown(app: web.Application) -> None:
        await app[BROKER].close()

    app.on_shutdown.append(shutdown)
    return app


async def main(devices: int, lifetime: float) -> None:
    raise_nofile()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(make_app(devices), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=4096).start()
    print(f"READY {sock.getsockname()[1]}", flush=True)
    try:
        await asyncio.sleep(lifetime)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--lifetime", type=float, default=150.0)
    args = parser.parse_args()
    asyncio.run(main(args.devices, args.lifetime))

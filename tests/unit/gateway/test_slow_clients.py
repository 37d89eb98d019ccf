"""Slow clients against the real listener (run_gateway): half-sent request heads and
dribbled bodies are timed out, and no answer names the server's software versions."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.app import run_gateway
from lab.api_client import RecordingBroker, make_settings

HALF_HEAD = b"POST /api/v1/login/requests HTTP/1.1\r\nHost: gw\r\nContent-Type: application/js"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[int]:
    port = _free_port()
    settings = make_settings(tmp_path, listen=f"127.0.0.1:{port}",
                             metrics_listen=f"127.0.0.1:{_free_port()}",
                             header_timeout=1.0, body_timeout=1.0)  # fmt: skip
    task = asyncio.create_task(run_gateway(settings, broker_factory=lambda _p: RecordingBroker()))
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/livez") as resp:
                    assert resp.status == 200
                break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _closed_after(port: int, payload: bytes, limit: float) -> float | None:
    """Seconds until the server closed a connection that sent ``payload`` (None: open at
    ``limit``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(payload)
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    finally:
        writer.close()
    return time.monotonic() - start


async def test_300_half_sent_heads_are_closed_within_the_header_timeout(gateway: int) -> None:
    held = await asyncio.gather(*(_closed_after(gateway, HALF_HEAD, 6.0) for _ in range(300)))
    assert None not in held, f"{held.count(None)} of 300 still open after 6 s"
    assert max(t for t in held if t is not None) < 4.0  # 1 s timeout; loaded 2-core slack
    url = f"http://127.0.0.1:{gateway}/livez"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:  # the gateway still serves
        assert resp.status == 200


async def test_a_dribbled_body_gets_408(gateway: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway)
    head = b"POST /api/v1/login/requests HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"
    writer.write(head + b'\r\nContent-Length: 200\r\n\r\n{"pub')
    try:
        async with asyncio.timeout(5.0):
            answer = await reader.read(4096)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer


async def test_no_answer_names_software_versions(gateway: int) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/livez", "/api/v1/keys", "/nowhere"):
            async with http.get(f"http://127.0.0.1:{gateway}{path}") as resp:
                assert resp.headers["Server"] == "wiregate", path
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway)
    writer.write(b"GET /livez HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n")  # malformed: a 400
    try:
        async with asyncio.timeout(5.0):
            answer = await reader.read(4096)
    finally:
        writer.close()
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:80]
    assert b"\r\nServer: wiregate\r\n" in answer and b"aiohttp" not in answer.lower()

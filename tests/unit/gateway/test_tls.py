"""The gateway's API over TLS: a real ``run_gateway`` on loopback with a lab CA."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

import wiregate.tls
from agent.gateway_client import ControlClient, connector
from gateway.app import run_gateway, tls_reloader
from lab.api_client import ADMIN, AUTH, make_settings
from lab.tls import LabCA, ServerPair
from wiregate.errors import ConfigError, Unavailable
from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Gateway:
    url: str
    port: int
    redirect_port: int
    ca: LabCA
    pair: ServerPair
    tmp: Path


@pytest.fixture
def reload_interval() -> float:
    return 0.1


@pytest.fixture
async def gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reload_interval: float
) -> AsyncIterator[Gateway]:
    monkeypatch.setattr(wiregate.tls, "RELOAD_INTERVAL", reload_interval)
    ca = LabCA.create(tmp_path / "ca")
    pair = ca.issue(tmp_path / "tls", ["127.0.0.1", "gateway.lab"])
    port, redirect_port = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path,
        listen=f"127.0.0.1:{port}",
        metrics_listen="127.0.0.1:0",
        tls_cert=pair.cert,
        tls_key=pair.key,
        public_url=url,
        http_redirect_listen=f"127.0.0.1:{redirect_port}",
    )
    task = asyncio.create_task(run_gateway(settings))
    for _ in range(1200):  # up once both listeners accept and SIGHUP is handled
        if task.done():
            task.result()
        hup = signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
        if hup and await accepts(port) and await accepts(redirect_port):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the gateway did not open its listeners within 60 s")
    try:
        yield Gateway(url, port, redirect_port, ca, pair, tmp_path)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def new_public_key() -> str:
    return encode_key(public_from_private(generate_private_key()))


async def enroll(gw: Gateway, session: aiohttp.ClientSession, name: str) -> Any:
    async with session.post(
        gw.url + "/api/v1/keys", json={"reusable": True, "expiry": 600}, headers=AUTH
    ) as resp:
        assert resp.status == 201, await resp.text()
        secret = (await resp.json())["secret"]
    client = ControlClient(gw.url, session)
    return await client.enroll(secret, new_public_key(), name, [], routes=[])


async def served_serial(gw: Gateway) -> int:
    """The serial of the certificate a new connection is shown."""
    ctx = wiregate.tls.client_context(gw.ca.ca_file)
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_enroll_and_stream_with_the_right_ca(gateway: Gateway) -> None:
    async with aiohttp.ClientSession(connector=connector(gateway.ca.ca_file)) as session:
        enrollment = await enroll(gateway, session, "tls-one")
        client = ControlClient(gateway.url, session)
        async for message, _ws in client.stream(enrollment.token, None):
            assert message["type"] in ("full", "map")
            break


async def test_hsts_over_tls_only(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession(connector=connector(gateway.ca.ca_file)) as session,
        session.get(gateway.url + "/livez") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
    unix = aiohttp.UnixConnector(path=str(gateway.tmp / "run" / "gw.sock"))
    async with (
        aiohttp.ClientSession(connector=unix) as session,
        session.get("http://gateway/livez") as resp,
    ):
        assert resp.status == 200
        assert "Strict-Transport-Security" not in resp.headers


async def test_another_ca_is_refused_in_one_line(gateway: Gateway) -> None:
    other = LabCA.create(gateway.tmp / "other", "another CA")
    async with aiohttp.ClientSession(connector=connector(other.ca_file)) as session:
        client = ControlClient(gateway.url, session)
        with pytest.raises(Unavailable) as caught:
            await client.enroll("x" * 32, new_public_key(), "nope", [], routes=[])
    message = caught.value.message
    assert message.startswith(f"TLS with {gateway.url} failed: "), message
    assert "certificate" in message and "\n" not in message


async def test_wrong_hostname_is_refused(gateway: Gateway) -> None:
    url = f"https://localhost:{gateway.port}"  # the certificate names 127.0.0.1 and gateway.lab
    async with aiohttp.ClientSession(connector=connector(gateway.ca.ca_file)) as session:
        with pytest.raises(Unavailable) as caught:
            await ControlClient(url, session).start_login(new_public_key(), "x")
    assert caught.value.message.startswith(f"TLS with {url} failed: ")
    assert "localhost" in caught.value.message


async def test_admin_cli_with_another_ca_prints_one_line(gateway: Gateway) -> None:
    other = LabCA.create(gateway.tmp / "other", "another CA")
    token = gateway.tmp / "admin.token"
    code = "import sys; from wiregate.cli.main import main; sys.exit(main())"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "admin", "--server", gateway.url, "--token-file", str(token),
        "--ca-file", str(other.ca_file), "keys", "list",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, (out, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: TLS with {gateway.url} failed: "), lines
    assert ADMIN not in err.decode()


async def test_reload_when_the_files_change_keeps_open_streams(gateway: Gateway) -> None:
    before = await served_serial(gateway)
    assert before == gateway.pair.serial
    async with aiohttp.ClientSession(connector=connector(gateway.ca.ca_file)) as session:
        first = await enroll(gateway, session, "tls-a")
        stream = ControlClient(gateway.url, session).stream(first.token, None)
        await anext(stream)  # the full map, on a connection made with the old certificate
        renewed = gateway.ca.issue(gateway.tmp / "tls", ["127.0.0.1", "gateway.lab"])
        for _ in range(100):
            if await served_serial(gateway) == renewed.serial:
                break
            await asyncio.sleep(0.1)
        assert await served_serial(gateway) == renewed.serial
        await enroll(gateway, session, "tls-b")  # a new peer: a delta on the old connection
        message, _ws = await asyncio.wait_for(anext(stream), 10)
        assert message["type"] == "delta", message
        await stream.aclose()


@pytest.mark.parametrize("reload_interval", [3600.0])  # no polling: only SIGHUP reloads
async def test_reload_on_sighup(gateway: Gateway) -> None:
    renewed = gateway.ca.issue(gateway.tmp / "tls", ["127.0.0.1"])
    await asyncio.sleep(0.3)
    assert await served_serial(gateway) == gateway.pair.serial
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):
        if await served_serial(gateway) == renewed.serial:
            break
        await asyncio.sleep(0.05)
    assert await served_serial(gateway) == renewed.serial


async def test_plain_http_listener_redirects_with_308(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{gateway.redirect_port}/login?code=ABC", allow_redirects=False
        ) as resp,
    ):
        assert resp.status == 308
        assert resp.headers["Location"] == f"{gateway.url}/login?code=ABC"


async def test_plain_http_to_the_tls_listener_fails(gateway: Gateway) -> None:
    plain = f"http://127.0.0.1:{gateway.port}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises((aiohttp.ClientError, OSError)):
            async with session.get(plain + "/livez") as resp:
                await resp.read()


def test_client_context_is_tls12_or_newer(gateway: Gateway) -> None:
    ctx = wiregate.tls.client_context(gateway.ca.ca_file)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


async def test_agent_with_another_ca_exits_without_enrolling(gateway: Gateway) -> None:
    other = LabCA.create(gateway.tmp / "other", "another CA")
    key = gateway.tmp / "auth.key"
    key.write_text("wgk_" + "x" * 40 + "\n")
    state = gateway.tmp / "agent-state"
    code = "import sys; from wiregate.cli.main import main; sys.exit(main())"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "agent", "--server", gateway.url,
        "--auth-key", f"file:{key}", "--ca-file", str(other.ca_file),
        "--state-dir", str(state), "--run-dir", str(gateway.tmp / "agent-run"),
        "--interface", "wgtls0", "--backend", "userspace", "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, (out, err)
    errors = [line for line in err.decode().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: TLS with {gateway.url} failed: ")
    assert "Traceback" not in err.decode()
    assert not (state / "device.json").exists()


def test_tls_files_from_systemd_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = LabCA.create(tmp_path / "ca")
    pair = ca.issue(tmp_path / "creds", ["127.0.0.1"])
    settings = make_settings(
        tmp_path, listen="127.0.0.1:0", tls_cert=Path("%d") / pair.cert.name,
        tls_key=Path("%d") / pair.key.name, public_url="https://127.0.0.1",
    )  # fmt: skip
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(pair.cert.parent))
    reloader = tls_reloader(settings)
    assert reloader is not None
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match=r"tls_cert %d/.*CREDENTIALS_DIRECTORY is not set"):
        tls_reloader(settings)

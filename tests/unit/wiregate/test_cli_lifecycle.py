"""``wiregate admin identities|audit`` and ``keys create --device-key-expiry`` against a real
gateway app on a unix socket (served from a thread with its own event loop)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from aiohttp import web
from click.testing import CliRunner, Result

from gateway.app import create_app
from lab.api_client import make_settings
from lab.fakes import FakeClock
from wiregate.cli.main import main


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gw.sock"
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(make_settings(tmp_path, token=False), clock=FakeClock()))
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.UnixSite(runner, str(path)).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield path
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def invoke(path: Path, *args: str) -> Result:
    with structlog.testing.capture_logs():  # the gateway's logs stay out of the output
        return CliRunner().invoke(main, ["admin", "--socket", str(path), *args])


def admin(path: Path, *args: str) -> str:
    result = invoke(path, *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_identities_and_audit_from_the_cli(socket_path: Path) -> None:
    created = json.loads(admin(socket_path, "keys", "create", "--device-key-expiry", "90d",
                               "--json"))  # fmt: skip
    assert created["key"]["device_key_expiry"] == 90 * 86400
    listed = admin(socket_path, "identities", "list")
    assert listed.splitlines()[0].split()[:3] == ["ID", "DISABLED", "DEVICES"]
    text = admin(socket_path, "audit")
    assert "admin:socket" in text and "key.create" in text and created["secret"] not in text
    events = json.loads(admin(socket_path, "audit", "--json", "--limit", "1"))["events"]
    assert [e["action"] for e in events] == ["key.create"]
    missing = invoke(socket_path, "identities", "revoke", "12345")
    assert missing.exit_code == 1 and "no such identity" in missing.output
    usage = invoke(socket_path, "identities", "disable")
    assert usage.exit_code == 2 and "--issuer and --subject" in usage.output


def test_a_created_key_on_stdout_is_the_secret_alone(socket_path: Path) -> None:
    """`wiregate admin keys create > key-file` must give the agent a usable key file."""
    result = invoke(socket_path, "keys", "create", "--tags", "tag:vm", "--expiry", "1h")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) >= 32 and not lines[0].startswith("#")
    assert result.stderr.startswith("# id key_")

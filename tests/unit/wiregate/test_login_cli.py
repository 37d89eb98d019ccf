"""``wiregate login`` and ``wiregate admin login`` against the real gateway app (test server)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result

from agent.gateway_client import ControlClient, LoginPoll, LoginStart
from agent.login import AlreadyEnrolled, LoginDenied, LoginExpired, login
from agent.state import Enrollment, StateDir
from lab.api_client import AUTH, Client
from lab.device_login import APPROVER
from lab.fakes import FakeClock
from wiregate.cli.main import main
from wiregate.keys import encode_key, fingerprint, public_from_private

CODE = re.compile(r"\b[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}\b")


class RecordingClient(ControlClient):
    """The real client, remembering the secrets it saw so the test can look for leaks."""

    def __init__(self, client: Client) -> None:
        super().__init__(str(client.make_url("")), client.session)
        self.started: LoginStart | None = None
        self.polls: list[LoginPoll] = []

    async def start_login(self, public_key: str, name: str) -> LoginStart:
        self.started = await super().start_login(public_key, name)
        return self.started

    async def poll_login(self, poll_token: str) -> LoginPoll:
        answer = await super().poll_login(poll_token)
        self.polls.append(answer)
        return answer

    def secrets(self) -> list[str]:
        assert self.started is not None
        tokens = [p.enrollment.token for p in self.polls if p.enrollment is not None]
        return [self.started.poll_token, *tokens]


Action = Callable[[str], Awaitable[None]]


class Harness:
    """An injected sleep (advancing the gateway's clock) and a captured output."""

    def __init__(self, clock: FakeClock, advances: list[float] | None = None) -> None:
        self.clock = clock
        self.lines: list[str] = []
        self.sleeps: list[float] = []
        self.advances = advances or []  # how far each sleep really moves the clock
        self.actions: dict[int, Action] = {}  # before the n-th wake-up (0-based), run this

    def out(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def user_code(self) -> str:
        found = CODE.search(self.text)
        assert found, self.text
        return found.group(0)

    async def sleep(self, seconds: float) -> None:
        n = len(self.sleeps)
        self.sleeps.append(seconds)
        self.clock.now += self.advances[n] if n < len(self.advances) else seconds
        if n in self.actions:
            await self.actions[n](self.user_code())


def approver(client: Client, **body: Any) -> Action:
    async def act(code: str) -> None:
        path = f"/api/v1/login/requests/{code}/approve"
        resp = await client.post(path, json={**APPROVER, **body}, headers=AUTH)
        assert resp.status == 200, await resp.text()

    return act


def denier(client: Client) -> Action:
    async def act(code: str) -> None:
        resp = await client.post(f"/api/v1/login/requests/{code}/deny", headers=AUTH)
        assert resp.status == 200, await resp.text()

    return act


def no_qr(_data: str) -> None:
    return None


async def test_full_flow_saves_the_enrollment_the_gateway_made(
    client: Client, clock: FakeClock, tmp_path: Path
) -> None:
    state = StateDir(tmp_path / "agent")
    rc, h = RecordingClient(client), Harness(clock)
    h.actions[1] = approver(client)  # pending once, then approved
    with structlog.testing.capture_logs() as logs:
        enrollment = await login(rc, state, "laptop-1", sleep=h.sleep, out=h.out, qr=no_qr)

    assert h.sleeps == [5, 5]
    assert [p.status for p in rc.polls] == ["pending", "approved"]
    device_file = state.path / "device.json"
    assert stat.S_IMODE(device_file.stat().st_mode) == 0o600
    assert state.load_enrollment() == enrollment
    saved = json.loads(device_file.read_text())

    resp = await client.get("/api/v1/devices", headers=AUTH)
    devices = (await resp.json())["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert saved["device_id"] == device["id"] and saved["addresses"] == device["addresses"]
    assert saved["name"] == "laptop-1" and saved["token"].startswith("wgd_")
    assert device["identity"] == {"issuer": APPROVER["issuer"], "subject": "alice"}

    # the key on disk is the key the gateway enrolled, and its fingerprint was shown
    private = base64.b64decode((state.path / "private.key").read_text())
    key = encode_key(public_from_private(private))
    assert device["public_key"] == key
    assert fingerprint(key) in h.text
    assert rc.started is not None
    assert rc.started.verification_uri in h.text and rc.started.user_code in h.text
    assert " ".join(device["addresses"]) in h.text
    assert f"wiregate agent --state-dir {state.path}" in h.text

    secrets = rc.secrets()
    assert len(secrets) == 2
    for secret in secrets:
        assert secret not in h.text and secret not in repr(logs)
    assert rc.started.poll_token not in repr(rc.started) and saved["token"] not in repr(enrollment)


async def test_denied_saves_nothing(client: Client, clock: FakeClock, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "agent")
    rc, h = RecordingClient(client), Harness(clock)
    h.actions[0] = denier(client)
    with pytest.raises(LoginDenied, match="denied"):
        await login(rc, state, "laptop-1", sleep=h.sleep, out=h.out, qr=no_qr)
    assert state.load_enrollment() is None
    assert not (state.path / "device.json").exists()
    resp = await client.get("/api/v1/devices", headers=AUTH)
    assert (await resp.json())["devices"] == []
    for secret in rc.secrets():
        assert secret not in h.text


async def test_expired_saves_nothing(client: Client, clock: FakeClock, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "agent")
    h = Harness(clock, advances=[601])
    with pytest.raises(LoginExpired, match="expired"):
        await login(RecordingClient(client), state, "laptop-1", sleep=h.sleep, out=h.out, qr=no_qr)
    assert state.load_enrollment() is None


async def test_slow_down_increases_the_wait(
    client: Client, clock: FakeClock, tmp_path: Path
) -> None:
    state = StateDir(tmp_path / "agent")
    rc = RecordingClient(client)
    h = Harness(clock, advances=[5, 1])  # the second wake-up comes too early
    h.actions[2] = approver(client)
    await login(rc, state, "laptop-1", sleep=h.sleep, out=h.out, qr=no_qr)
    assert [p.status for p in rc.polls] == ["pending", "slow_down", "approved"]
    assert h.sleeps == [5, 5, 10]
    assert state.load_enrollment() is not None


class ExplodingClient:
    async def start_login(self, public_key: str, name: str) -> LoginStart:
        raise AssertionError("must not ask the gateway")

    async def poll_login(self, poll_token: str) -> LoginPoll:
        raise AssertionError("must not ask the gateway")


def enrolled_state(path: Path) -> StateDir:
    state = StateDir(path)
    state.ensure()
    state.save_enrollment(Enrollment("dev_1", "old-host", ("100.64.0.9/32",), "wgd_secret"))
    return state


async def test_existing_enrollment_is_refused(tmp_path: Path) -> None:
    state = enrolled_state(tmp_path / "agent")
    h = Harness(FakeClock())
    with pytest.raises(AlreadyEnrolled, match="old-host") as err:
        await login(ExplodingClient(), state, "laptop-1", sleep=h.sleep, out=h.out, qr=no_qr)
    assert err.value.hint and "wiregate agent --state-dir" in err.value.hint
    assert state.load_enrollment() is not None and h.sleeps == [] and h.lines == []


def test_cli_refuses_an_enrolled_state_dir(tmp_path: Path) -> None:
    state = enrolled_state(tmp_path / "agent")
    args = ["login", "--server", "http://127.0.0.1:9", "--state-dir", str(state.path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "already holds the enrollment" in result.output and "wgd_secret" not in result.output


def test_qr_code_is_shown_when_a_renderer_answers(tmp_path: Path) -> None:
    started = LoginStart(
        "lr_1",
        "BCDF-GHJK",
        "https://gw/login",
        "https://gw/login?code=BCDF-GHJK",
        "wgp_secret",
        5,
        600,
    )

    class Approving:
        async def start_login(self, public_key: str, name: str) -> LoginStart:
            return started

        async def poll_login(self, poll_token: str) -> LoginPoll:
            enrollment = Enrollment("dev_2", name="h", addresses=("100.64.0.2/32",), token="wgd_x")
            return LoginPoll("approved", 5, enrollment)

    h = Harness(FakeClock())
    seen: list[str] = []

    def qr(data: str) -> str:
        seen.append(data)
        return "[QR]"

    asyncio.run(login(Approving(), StateDir(tmp_path / "a"), "h", sleep=h.sleep, out=h.out, qr=qr))
    assert seen == [started.verification_uri_complete] and "[QR]" in h.lines
    assert "wgp_secret" not in h.text and "wgd_x" not in h.text


# -- wiregate admin login ------------------------------------------------------------


def _json_block(stdout: str) -> str:
    found = re.search(r"^\{$.*", stdout, re.M | re.S)
    assert found, stdout
    return found.group(0)


async def admin_cli(client: Client, tmp_path: Path, *args: str) -> Result:
    """Run ``wiregate admin --server … login …`` in a thread (it runs its own event loop)."""
    base = ["admin", "--server", str(client.make_url("")).rstrip("/")]
    base += ["--token-file", str(tmp_path / "admin.token"), "login"]
    return await asyncio.to_thread(CliRunner().invoke, main, [*base, *args])


async def test_admin_cli_show_approve_and_deny(
    client: Client, clock: FakeClock, tmp_path: Path
) -> None:
    rc = RecordingClient(client)
    first = await rc.start_login(encode_key(public_from_private(b"\x01" * 32)), "laptop-1")

    shown = await admin_cli(client, tmp_path, "show", first.user_code.lower())
    assert shown.exit_code == 0, shown.output
    assert "laptop-1" in shown.output and "pending" in shown.output
    key = encode_key(public_from_private(b"\x01" * 32))
    assert fingerprint(key) in shown.output

    approved = await admin_cli(
        client,
        tmp_path,
        "approve",
        first.user_code,
        "--issuer",
        str(APPROVER["issuer"]),
        "--subject",
        "alice",
        "--tags",
        "tag:laptop, tag:dev",
        "--json",
    )
    assert approved.exit_code == 0, approved.output
    # the gateway's own log lines share the captured stdout (same process): skip them
    doc = json.loads(_json_block(approved.stdout))
    assert doc["device"]["tags"] == ["tag:laptop", "tag:dev"] and "token" not in doc

    again = await admin_cli(client, tmp_path, "deny", first.user_code)
    assert again.exit_code == 1 and "error:" in again.output

    second = await rc.start_login(encode_key(public_from_private(b"\x02" * 32)), "laptop-2")
    denied = await admin_cli(client, tmp_path, "deny", second.user_code)
    assert denied.exit_code == 0, denied.output
    assert "denied laptop-2" in denied.output
    clock.now += 5
    assert (await rc.poll_login(second.poll_token)).status == "denied"


def test_real_qr_code_renders_as_a_square_block() -> None:
    from agent.login import render_qr

    text = render_qr("http://198.51.100.1:8080/login?code=BCDF-GHJK")
    assert text is not None
    lines = text.splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines}) == 1  # a square-ish block
    assert set(text) <= {"█", "▀", "▄", " ", "\xa0", "\n"}  # half blocks and spaces

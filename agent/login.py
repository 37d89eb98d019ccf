"""``wiregate login``: enroll this host by device login, approved by a person.

The host's WireGuard key is loaded or created locally (it never leaves the
host); the gateway is asked for a login request, whose verification URL, user
code and key fingerprint are shown to the person, who approves it elsewhere
(the SSO page, or ``wiregate admin login approve``). Meanwhile the request is
polled, no faster than the gateway's ``interval`` (growing on ``slow_down``).
On approval the enrollment is saved to the agent's state dir, so that
``wiregate agent --state-dir …`` joins the mesh without enrolling again.

The poll token and the device token are never printed or logged.
"""

from __future__ import annotations

import importlib
import io
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from agent.gateway_client import LoginPoll, LoginStart
from agent.keyfile import load_or_create_key
from agent.state import Enrollment, StateDir
from wiregate.errors import LocalError, RemoteError, Unavailable
from wiregate.keys import encode_key, fingerprint, public_from_private
from wiregate.logging import get_logger

__all__ = [
    "AlreadyEnrolled",
    "LoginClient",
    "LoginDenied",
    "LoginExpired",
    "Output",
    "Sleep",
    "login",
    "render_qr",
]

log = get_logger("login")

Sleep = Callable[[float], Awaitable[object]]
Output = Callable[[str], None]
QrRenderer = Callable[[str], str | None]

SLOW_DOWN_STEP = 5  # RFC 8628 §3.5, if the gateway does not say the new interval
MIN_INTERVAL = 1


class LoginClient(Protocol):
    """What :func:`login` needs from the gateway (:class:`~agent.gateway_client.ControlClient`)."""

    async def start_login(self, public_key: str, name: str) -> LoginStart: ...

    async def poll_login(self, poll_token: str) -> LoginPoll: ...


class AlreadyEnrolled(LocalError):
    """The state dir already holds an enrollment; logging in again would orphan it."""

    code = "already_enrolled"


class LoginDenied(RemoteError):
    """The approver denied the login request."""

    status = 403
    code = "login_denied"


class LoginExpired(RemoteError):
    """The login request expired (or was used) before this host collected its token."""

    status = 410
    code = "login_expired"


def render_qr(data: str) -> str | None:
    """A terminal QR code of ``data`` if the optional ``qrcode`` package is installed."""
    try:
        qrcode = importlib.import_module("qrcode")
    except ImportError:
        return None
    qr = qrcode.QRCode(border=1)
    qr.add_data(data)
    qr.make(fit=True)
    buf = io.StringIO()
    qr.print_ascii(out=buf, invert=True)
    return buf.getvalue().rstrip("\n")


async def login(
    client: LoginClient,
    state: StateDir,
    name: str,
    *,
    sleep: Sleep,
    out: Output,
    qr: QrRenderer = render_qr,
    server: str = "",
) -> Enrollment:
    """Log this host in; return the saved enrollment, or raise (nothing saved).

    ``server``, the gateway URL used, is saved beside the enrollment: ``wiregate
    agent`` without ``--server`` uses it."""
    existing = state.load_enrollment()
    if existing is not None:
        raise AlreadyEnrolled(
            f"{state.path} already holds the enrollment of device "
            f"{existing.name} ({existing.device_id})",
            hint=f"start `{agent_command(state.path)}` to use it, "
            "or give another --state-dir to log in as a new device",
        )
    state.ensure()
    public_key = encode_key(public_from_private(load_or_create_key(state.path)))
    started = await client.start_login(public_key, name)
    log.info("login requested", request_id=started.request_id, name=name)
    _show(started, fingerprint(public_key), out, qr)
    answer = await _wait(client, started, sleep, out)
    enrollment = answer.enrollment
    assert enrollment is not None
    state.save_enrollment(enrollment)
    if server:
        state.save_server(server)
    log.info("login approved", request_id=started.request_id, device_id=enrollment.device_id)
    out(f"Approved: this host is device {enrollment.name} ({enrollment.device_id}).")
    out(f"Addresses: {' '.join(enrollment.addresses)}")
    out(f"Start `{agent_command(state.path)}` to bring the tunnel up.")
    return enrollment


def agent_command(state_dir: Path) -> str:
    """The command that starts the agent on ``state_dir``."""
    return f"wiregate agent --state-dir {shlex.quote(str(state_dir))}"


def _show(started: LoginStart, key_fingerprint: str, out: Output, qr: QrRenderer) -> None:
    out("To log this host in, open:")
    out("")
    out(f"    {started.verification_uri}")
    out("")
    out("and enter the code:")
    out("")
    out(f"    {started.user_code}")
    out("")
    out(f"Check that the page shows this key fingerprint: {key_fingerprint}")
    code = qr(started.verification_uri_complete)
    if code:
        out("")
        out(f"Or scan this to open {started.verification_uri_complete}:")
        out(code)
    minutes = max(1, round(started.expires_in / 60))
    out("")
    out(f"Waiting for approval (the code expires in {minutes} min)…")


async def _wait(client: LoginClient, started: LoginStart, sleep: Sleep, out: Output) -> LoginPoll:
    """Poll until approved; raise on denied or expired."""
    interval = max(started.interval, MIN_INTERVAL)
    waited = 0.0
    unreachable = False
    while True:
        await sleep(interval)
        waited += interval
        try:
            answer = await client.poll_login(started.poll_token)
        except Unavailable as exc:  # a blip: the request waits on the gateway
            if waited > started.expires_in:
                raise
            if not unreachable:
                out(f"(gateway unreachable, still trying: {exc.message})")
            unreachable = True
            continue
        unreachable = False
        if answer.status == "approved" and answer.enrollment is not None:
            return answer
        if answer.status == "denied":
            log.info("login denied", request_id=started.request_id)
            raise LoginDenied(
                "the login request was denied; nothing was saved",
                hint="ask the approver, then run `wiregate login` again",
            )
        if answer.status == "expired" or waited > started.expires_in + interval:
            log.info("login expired", request_id=started.request_id)
            raise LoginExpired(
                "the login request expired before it was approved; nothing was saved",
                hint="run `wiregate login` again for a new code",
            )
        if answer.status == "slow_down":
            interval = max(answer.interval or 0, interval + SLOW_DOWN_STEP)
        elif answer.interval:
            interval = max(answer.interval, MIN_INTERVAL)

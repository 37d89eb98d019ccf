"""This host's tunnel switch: ``wiregate up``, ``wiregate down`` and ``wiregate logout``.

``up`` enrolls when not enrolled (device login, or ``--auth-key`` file:/env:), then
starts the agent (the systemd unit ``wiregate-agent.service`` when installed, else a
background ``wiregate agent``) or, when an agent runs with its tunnel down, tells
it to bring the tunnel back. ``down`` and ``logout`` talk to the running agent
over its local socket (:mod:`agent.control`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from wiregate.cli.admin import run_or_exit
from wiregate.cli.device import device_login
from wiregate.cli.options import config_option, exit_with, settings_or_exit
from wiregate.errors import LocalError, Unavailable, WiregateError
from wiregate.settings import AgentSettings

if TYPE_CHECKING:
    from agent.state import Enrollment

__all__ = ["agent_command", "down", "logout", "run_dir_option", "up"]

UNIT = "wiregate-agent.service"

run_dir_option = click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="WIREGATE_RUN_DIR",
    default=str(AgentSettings.model_fields["run_dir"].default),
    show_default=True,
    help="The agent's run dir (its status and control socket).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")

# the `wiregate agent` flags `up` passes on to a background agent, when given
_PASSED = ("server", "state_dir", "run_dir", "interface", "hostname", "listen_port",
           "backend", "ca_file", "auth_key")  # fmt: skip


@click.command()
@config_option
@click.option("--server", help="Gateway URL (default: the one saved at the last login).")
@click.option("--auth-key", help="Enroll with this key, as file:PATH or env:VAR (no login).")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--interface", help="WireGuard interface name (default wg0).")
@click.option("--hostname", help="Device name (default: this host's name).")
@click.option("--listen-port", type=int)
@click.option("--backend", type=click.Choice(["auto", "kernel", "userspace"]))
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False),
              help="PEM CA trusted for the gateway's HTTPS.")  # fmt: skip
@click.option(
    "--service",
    type=click.Choice(["auto", "systemd", "none"]),
    default="auto",
    show_default=True,
    help=f"Start the agent with systemd's {UNIT} (auto: when installed) or in the background.",
)
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the tunnel.")  # fmt: skip
@json_option
def up(config_file: Path | None, service: str, timeout: float, as_json: bool, **flags: Any) -> None:
    """Bring this host's tunnel up: log in or enroll if needed, then run the agent."""
    auth_key = flags.get("auth_key")
    if auth_key and not re.match(r"^(file|env):.+", auth_key):
        raise click.BadParameter(
            "give the key as file:PATH or env:VAR; a key on the command line leaks into ps",
            param_hint="--auth-key",
        )
    from agent.control import call_agent
    from agent.state import with_saved_server

    settings = with_saved_server(settings_or_exit(AgentSettings, config_file, **flags))
    sock = settings.run_dir / "agent.sock"
    proc: subprocess.Popen[bytes] | None = None
    if run_or_exit(_answers(sock)):
        run_or_exit(call_agent(sock, "POST", "/control", {"op": "up"}))
    else:
        _ensure_enrolled(settings, flags, as_json)
        _want_up(settings.state_dir)
        proc = _start_agent(settings, config_file, flags, service)
    doc = run_or_exit(_wait_up(sock, timeout, proc, settings.run_dir / "agent.log"))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    dev = doc.get("device", {})
    state = "connected" if doc["gateway"].get("connected") else "not connected to the gateway yet"
    click.echo(f"up: {dev.get('name')} ({dev.get('id')}) {' '.join(dev.get('addresses', []))} "
               f"on {doc.get('interface')}, {state}")  # fmt: skip


async def _answers(sock: Path) -> bool:
    from agent.status import fetch_status

    try:
        await fetch_status(sock)
    except Unavailable:
        return False
    return True


def _ensure_enrolled(settings: AgentSettings, flags: dict[str, Any], as_json: bool) -> Enrollment:
    """The saved enrollment; else enroll with the auth key / workload token, else log in."""
    from agent.daemon import Agent
    from agent.state import StateDir

    try:
        enrollment = StateDir(settings.state_dir).load_enrollment()
    except PermissionError as exc:
        raise click.ClickException(
            f"cannot read {settings.state_dir}: {exc.strerror} (run as root)"
        ) from exc
    except LocalError as exc:
        raise click.ClickException(exc.message) from exc
    if enrollment is not None:
        return enrollment
    if "server" not in settings.model_fields_set:  # neither given nor saved by a login
        raise click.UsageError("not enrolled yet: give the gateway with --server URL")
    if settings.auth_key or settings.workload_token or settings.kubernetes:
        return run_or_exit(Agent(settings, check_privileges=lambda: None).enroll())

    def out(line: str) -> None:
        click.echo(line, err=as_json)

    return device_login(settings.server, settings.state_dir, flags.get("hostname"),
                        settings.ca_file, out)  # fmt: skip


def _want_up(state_dir: Path) -> None:
    from agent.control import save_wanted

    try:
        save_wanted(state_dir, True)
    except OSError as exc:
        raise click.ClickException(f"cannot write to {state_dir}: {exc.strerror}") from exc


def agent_command(config_file: Path | None, flags: dict[str, Any]) -> list[str]:
    """The ``wiregate agent`` command line for the flags ``up`` was given (no secret:
    the auth key is a file:/env: reference)."""
    exe = sys.argv[0] if Path(sys.argv[0]).name == "wiregate" else None
    cmd = [exe] if exe else [sys.executable, "-c", "from wiregate.cli.main import main; main()"]
    cmd.append("agent")
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    for name in _PASSED:
        if flags.get(name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(flags[name])]
    return cmd


def _systemd_unit_installed() -> bool:
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return False
    probe = subprocess.run(["systemctl", "cat", UNIT], capture_output=True, check=False)
    return probe.returncode == 0


def _start_agent(
    settings: AgentSettings,
    config_file: Path | None,
    flags: dict[str, Any],
    service: str,
) -> subprocess.Popen[bytes] | None:
    """Start the agent: ``systemctl start`` the unit, or a background process (returned)."""
    if service == "systemd" or (service == "auto" and _systemd_unit_installed()):
        done = subprocess.run(["systemctl", "start", UNIT], capture_output=True, check=False)
        if done.returncode != 0:
            raise click.ClickException(f"systemctl start {UNIT}: {done.stderr.decode().strip()}")
        return None
    log_path = settings.run_dir / "agent.log"
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    log = _open_log(log_path)
    try:
        return subprocess.Popen(
            agent_command(config_file, flags),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal
        )
    except OSError as exc:
        raise click.ClickException(f"cannot start the agent: {exc.strerror}") from exc
    finally:
        log.close()


def _open_log(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


async def _wait_up(
    sock: Path, within: float, proc: subprocess.Popen[bytes] | None, log: Path
) -> dict[str, Any]:
    """The agent's status once its tunnel is up (and, within ``within`` s, connected)."""
    from agent.status import fetch_status

    deadline = time.monotonic() + within
    doc: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalError(f"the agent exited ({proc.returncode}): {_tail(log)}")
        try:
            doc = await fetch_status(sock)
        except Unavailable:
            doc = None
        if doc is not None and doc.get("state") == "up" and doc["gateway"].get("connected"):
            return doc
        await asyncio.sleep(0.3)
    if doc is not None and doc.get("state") == "up":
        return doc  # up on its last map; the gateway is not answering yet
    where = f"; its log: {log}" if proc is not None else f"; see journalctl -u {UNIT}"
    raise Unavailable(f"the tunnel did not come up within {within:g} s{where}")


def _tail(log: Path) -> str:
    """The agent's last log line (its error), for ``up`` to show."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {log}"
    return lines[-1] if lines else f"see {log}"


@click.command()
@run_dir_option
@json_option
def down(run_dir: Path, as_json: bool) -> None:
    """Take this host's tunnel down; its key and enrollment stay (``wiregate up`` again)."""
    from agent.control import call_agent

    doc = run_or_exit(call_agent(run_dir / "agent.sock", "POST", "/control", {"op": "down"}))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"down: {doc.get('interface')} removed; key and enrollment kept "
               "(`wiregate up` brings it back)")  # fmt: skip


@click.command()
@config_option
@run_dir_option
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              help="With no agent running: the agent's state dir.")  # fmt: skip
@click.option("--interface", help="With no agent running: the interface to remove.")
@json_option
def logout(
    config_file: Path | None,
    run_dir: Path,
    state_dir: Path | None,
    interface: str | None,
    as_json: bool,
) -> None:
    """Take the tunnel down, delete this device at the gateway and its local key and state."""
    from agent.control import call_agent

    try:
        doc = asyncio.run(call_agent(run_dir / "agent.sock", "POST", "/control", {"op": "logout"}))
    except Unavailable:  # no agent runs: its tunnel may still be up (fail static)
        doc = _logout_stopped(config_file, run_dir, state_dir, interface)
    except WiregateError as exc:
        exit_with(exc)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    device = doc.get("device_id")
    if doc.get("deleted_at_gateway"):
        click.echo(f"logged out: device {device} deleted; local key and state deleted")
        return
    click.echo(f"logged out locally: key and state deleted; the gateway did not answer "
               f"({doc.get('note')})", err=True)  # fmt: skip
    click.echo(f"hint: delete it there with `wiregate admin devices remove {device}`", err=True)


def _logout_stopped(
    config_file: Path | None, run_dir: Path, state_dir: Path | None, interface: str | None
) -> dict[str, Any]:
    from agent.daemon import Agent
    from agent.state import with_saved_server

    settings = settings_or_exit(AgentSettings, config_file, run_dir=run_dir,
                                state_dir=state_dir, interface=interface)  # fmt: skip
    agent = Agent(with_saved_server(settings), check_privileges=lambda: None)
    return run_or_exit(agent.logout_stopped())

"""``wiregate rotate``: ask the local agent to rotate its WireGuard key now.

The agent behind ``RUN_DIR/agent.sock`` is found by the socket's peer
credentials (SO_PEERCRED) and sent SIGUSR1; the command then waits until
``status`` shows the new key (the map carrying it has been applied).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from pathlib import Path

import click

from wiregate.cli.admin import run_or_exit
from wiregate.errors import Unavailable
from wiregate.keys import fingerprint

__all__ = ["agent_pid", "rotate"]


def agent_pid(sock_path: Path) -> int:
    """The pid of the process serving the agent's status socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(sock_path))
        except OSError as exc:
            raise Unavailable(f"no agent answers on {sock_path}") from exc
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"agent" not in cmdline:
        raise Unavailable(f"the process behind {sock_path} (pid {pid}) is not a wiregate agent")
    return pid


async def _wait_for_new_key(sock_path: Path, old: str, within: float) -> str:
    from agent.status import fetch_status

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        doc = await fetch_status(sock_path)
        current = str(doc.get("device", {}).get("public_key", ""))
        if current and current != old:
            return current
        await asyncio.sleep(0.2)
    raise Unavailable(
        f"the agent did not switch keys within {within:.0f} s",
        hint="see the agent's log (key rotation failed / refused)",
    )


@click.command()
@click.option(
    "--run-dir", type=click.Path(path_type=Path, file_okay=False), default="/run/wiregate"
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the switch.")
def rotate(run_dir: Path, timeout: float) -> None:
    """Rotate this host's WireGuard key now (make-before-break; peers keep their tunnels)."""
    from agent.status import fetch_status

    sock_path = run_dir / "agent.sock"
    old = str(run_or_exit(fetch_status(sock_path)).get("device", {}).get("public_key", ""))
    try:
        os.kill(agent_pid(sock_path), signal.SIGUSR1)
    except Unavailable as exc:
        raise click.ClickException(exc.message) from exc
    new = run_or_exit(_wait_for_new_key(sock_path, old, timeout))
    click.echo(f"rotated: {fingerprint(old)} -> {fingerprint(new)}")

"""The process verbs: ``wiregate gateway``, ``wiregate relay`` and ``wiregate agent``.

Each imports its process only when it runs, so the other verbs start fast.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import click

from wiregate.cli.admin import run_or_exit
from wiregate.cli.options import config_option, exit_with, settings_or_exit, with_logs
from wiregate.errors import WiregateError
from wiregate.settings import AgentSettings, GatewaySettings, RelaySettings

__all__ = ["agent", "gateway", "relay"]


@click.command()
@config_option
@click.option("--listen", help="API address, HOST:PORT.")
@click.option("--metrics-listen", help="Prometheus metrics address, HOST:PORT.")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--admin-socket", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--admin-token-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--database-url", help="SQLAlchemy URL; default: SQLite in the state dir.")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False),
              help="PEM certificate chain: the API serves HTTPS (with --tls-key).")  # fmt: skip
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False),
              help="PEM private key of --tls-cert (mode 0600).")  # fmt: skip
@click.option("--http-redirect-listen", help="Plain-HTTP HOST:PORT answering 308 to public_url.")
@with_logs
def gateway(config_file: Path | None, **flags: Any) -> None:
    """Run the control plane (API, map streams, admin socket, metrics)."""
    from gateway.app import run_gateway
    from gateway.preflight import preflight

    settings = settings_or_exit(GatewaySettings, config_file, **flags)
    try:  # busy ports, a live admin socket, a second gateway: refused before anything changes
        lock = preflight(settings)
    except WiregateError as exc:
        exit_with(exc)
    _raise_nofile()
    with lock:
        run_or_exit(run_gateway(settings))


def _raise_nofile() -> None:
    """One socket per connected agent: lift the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@click.command()
@config_option
@click.option("--stun-listen", multiple=True, help="STUN address HOST:PORT (repeatable).")
@click.option("--metrics-listen", help="Prometheus metrics address, HOST:PORT.")
@click.option("--relay-id", help="This relay's id in tickets; empty: STUN only.")
@click.option("--relay-listen", help="Relay control port address, HOST:PORT.")
@click.option("--relay-ports", help='Relay port range, e.g. "40000-40063".')
@click.option(
    "--verify-keys-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="JSON file of trusted gateway signers (GET /api/v1/relay/signers).",
)
@click.option("--signers-url", help="The gateway's GET /api/v1/relay/signers URL (instead).")
@with_logs
def relay(config_file: Path | None, stun_listen: tuple[str, ...], **flags: Any) -> None:
    """Run the STUN server and, with a relay id, the authenticated WireGuard relay."""
    from relay.aio.forwarding import forwarding_from_settings
    from relay.aio.stun import run_relay

    # no --stun-listen: WIREGATE_STUN_LISTEN, the file or the default decide
    stun = list(stun_listen) or None
    settings = settings_or_exit(RelaySettings, config_file, stun_listen=stun, **flags)
    try:
        forwarding = forwarding_from_settings(settings)
    except WiregateError as exc:
        hint = f"\nhint: {exc.hint}" if exc.hint else ""
        raise click.ClickException(exc.message + hint) from exc
    run_or_exit(run_relay(settings, forwarding=forwarding))


@click.command()
@config_option
@click.option("--server", help="Gateway URL, e.g. https://gateway.example:443.")
@click.option("--auth-key", help="Enrollment key as file:PATH or env:VAR (never the key itself).")
@click.option("--workload-token", help="Workload identity token as file:PATH (instead of a key).")
@click.option("--interface", help="WireGuard interface name (default wg0).")
@click.option("--listen-port", type=int)
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--hostname", help="Device name (default: this host's name).")
@click.option("--backend", type=click.Choice(["auto", "kernel", "userspace"]))
@click.option("--endpoint", "endpoints", multiple=True, help="Extra endpoint IP:PORT to advertise.")
@click.option("--mtu", type=int, help="Tunnel MTU (default: underlay MTU minus 60/80).")
@click.option("--metrics-listen", help="Prometheus metrics address, HOST:PORT (default: off).")
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False),
              help="PEM CA trusted for the gateway's HTTPS (besides the system's).")  # fmt: skip
@with_logs
def agent(config_file: Path | None, endpoints: tuple[str, ...], **flags: Any) -> None:
    """Enroll this host and keep its WireGuard interface in step with the gateway."""
    auth_key = flags.get("auth_key")
    if auth_key and not re.match(r"^(file|env):.+", auth_key):
        raise click.BadParameter(
            "give the key as file:PATH or env:VAR; a key on the command line leaks into ps",
            param_hint="--auth-key",
        )
    from agent.daemon import Agent, DeviceRevoked
    from agent.state import with_saved_server

    extra = list(endpoints) or None  # no --endpoint: WIREGATE_ENDPOINTS or the file decide
    settings = settings_or_exit(AgentSettings, config_file, endpoints=extra, **flags)
    settings = with_saved_server(settings)  # no --server: the gateway `wiregate login` used
    try:
        run_or_exit(Agent(settings).run_until_signalled())
    except DeviceRevoked as exc:
        click.echo(f"device revoked: {exc}", err=True)
        sys.exit(3)

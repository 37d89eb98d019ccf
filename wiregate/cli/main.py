"""The ``wiregate`` command: gateway, relay, agent, status and admin.

Flags win over ``WIREGATE_…`` environment variables, which win over the TOML
file given with ``--config`` (or ``WIREGATE_CONFIG``), which wins over defaults.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wiregate.cli.admin import admin, run_or_exit
from wiregate.cli.backup import backup, restore
from wiregate.cli.policy import policy
from wiregate.cli.rotate import rotate
from wiregate.errors import WiregateError
from wiregate.logging import configure_logging
from wiregate.settings import AgentSettings, GatewaySettings, RelaySettings, load_settings

if TYPE_CHECKING:  # imported lazily at run time: the CLI starts fast
    from agent.discovery.netcheck import NetReport
    from relay.endpoints import RelayEndpoint

__all__ = ["main"]


_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="WIREGATE_CONFIG",
    help="TOML configuration file.",
)
_log_options = [
    click.option("--log-level", default=None, help="debug, info, warning, error."),
    click.option("--log-format", default=None, help="auto, json or console."),
]


def _with_logs(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_log_options):
        fn = option(fn)
    return fn


def _settings(cls: type[Any], config_file: Path | None, **flags: Any) -> Any:
    try:
        settings = load_settings(cls, config_file, **flags)
    except WiregateError as exc:
        raise click.ClickException(exc.message) from exc
    configure_logging(settings.log_level, settings.log_format)
    return settings


@click.group()
@click.version_option(package_name="wiregate")
def main() -> None:
    """wiregate: a WireGuard mesh for Kubernetes nodes, VMs and people, with OIDC identity."""


@main.command()
@_config_option
@click.option("--listen", help="API address, HOST:PORT.")
@click.option("--metrics-listen", help="Prometheus metrics address, HOST:PORT.")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--admin-socket", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--admin-token-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--database-url", help="SQLAlchemy URL; default: SQLite in the state dir.")
@_with_logs
def gateway(config_file: Path | None, **flags: Any) -> None:
    """Run the control plane (API, map streams, admin socket, metrics)."""
    from gateway.app import run_gateway

    settings = _settings(GatewaySettings, config_file, **flags)
    _raise_nofile()
    run_or_exit(run_gateway(settings))


def _raise_nofile() -> None:
    """One socket per connected agent: lift the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@main.command()
@_config_option
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
@_with_logs
def relay(config_file: Path | None, stun_listen: tuple[str, ...], **flags: Any) -> None:
    """Run the STUN server and, with a relay id, the authenticated WireGuard relay."""
    from relay.aio.forwarding import forwarding_from_settings
    from relay.aio.stun import run_relay

    settings = _settings(RelaySettings, config_file, stun_listen=list(stun_listen), **flags)
    try:
        forwarding = forwarding_from_settings(settings)
    except WiregateError as exc:
        hint = f"\nhint: {exc.hint}" if exc.hint else ""
        raise click.ClickException(exc.message + hint) from exc
    run_or_exit(run_relay(settings, forwarding=forwarding))


@main.command()
@_config_option
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
@_with_logs
def agent(config_file: Path | None, endpoints: tuple[str, ...], **flags: Any) -> None:
    """Enroll this host and keep its WireGuard interface in step with the gateway."""
    auth_key = flags.get("auth_key")
    if auth_key and not re.match(r"^(file|env):.+", auth_key):
        raise click.BadParameter(
            "give the key as file:PATH or env:VAR; a key on the command line leaks into ps",
            param_hint="--auth-key",
        )
    from agent.daemon import Agent, DeviceRevoked

    settings = _settings(AgentSettings, config_file, endpoints=list(endpoints), **flags)
    try:
        run_or_exit(Agent(settings).run_until_signalled())
    except DeviceRevoked as exc:
        click.echo(f"device revoked: {exc}", err=True)
        sys.exit(3)


@main.command()
@click.option(
    "--server",
    envvar="WIREGATE_SERVER",
    required=True,
    help="Gateway URL, e.g. https://gateway.example:443.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="WIREGATE_STATE_DIR",
    default=str(AgentSettings.model_fields["state_dir"].default),
    show_default=True,
    help="The agent's state dir (key and enrollment).",
)
@click.option("--hostname", help="Device name (default: this host's name).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def login(server: str, state_dir: Path, hostname: str | None, as_json: bool) -> None:
    """Enroll this host by device login: show a code, wait for a person to approve it."""
    import socket

    import aiohttp

    from agent.gateway_client import ControlClient
    from agent.login import login as device_login
    from agent.state import StateDir

    def out(line: str) -> None:
        click.echo(line, err=as_json)

    async def go() -> Any:
        async with aiohttp.ClientSession() as session:
            client = ControlClient(server, session)
            name = hostname or socket.gethostname().split(".")[0]
            return await device_login(
                client, StateDir(state_dir), name, sleep=asyncio.sleep, out=out
            )

    enrollment = run_or_exit(go())
    if as_json:
        doc = {
            "status": "approved",
            "device": {
                "id": enrollment.device_id,
                "name": enrollment.name,
                "addresses": list(enrollment.addresses),
            },
            "state_dir": str(state_dir),
        }
        click.echo(json.dumps(doc, indent=2))


@main.command()
@click.option(
    "--run-dir", type=click.Path(path_type=Path, file_okay=False), default="/run/wiregate"
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run_dir: Path, as_json: bool) -> None:
    """Show this host's device, its gateway connection and its peers."""
    from agent.status import fetch_status

    doc = run_or_exit(fetch_status(run_dir / "agent.sock"))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(_format_status(doc))


def _expiry(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _format_status(doc: dict[str, Any]) -> str:
    dev, gw = doc.get("device", {}), doc.get("gateway", {})
    state = "connected" if gw.get("connected") else f"disconnected ({gw.get('last_error', '')})"
    addresses = " ".join(dev.get("addresses", []))
    lines = [
        f"device    {dev.get('name', '?')} ({dev.get('id', '?')})  {addresses}",
        f"key       {dev.get('public_key', '?')}  expires {_expiry(dev.get('expires_at'))}",
        f"interface {doc.get('interface')} [{doc.get('backend')}]",
        f"gateway   {gw.get('server')}  {state}  map v{gw.get('map_version')}",
        "",
        f"{'PEER':<20} {'ADDRESS':<16} {'PATH':<14} {'ENDPOINT':<24} {'HANDSHAKE':>10} "
        f"{'RX':>10} {'TX':>10}",
    ]
    now = time.time()
    for p in doc.get("peers", []):
        hs = p.get("last_handshake")
        age = f"{max(0, int(now - hs))}s ago" if hs else "never"  # a clock stepped back: 0
        addr = (p.get("addresses") or ["?"])[0].split("/")[0]
        path = p.get("path") or {}
        kind = path.get("path", "-")
        if kind == "relayed" and path.get("relay"):
            kind = f"relay:{path['relay']}"
        lines.append(
            f"{p['name'][:20]:<20} {addr:<16} {kind[:14]:<14} {p.get('endpoint') or '-'!s:<24} "
            f"{age:>10} {p.get('rx_bytes', 0):>10} {p.get('tx_bytes', 0):>10}"
        )
        if path.get("reason"):
            lines.append(f"{'':<20} why: {path['reason']}")
        if p.get("path_mtu"):
            lines.append(f"{'':<20} path MTU {p['path_mtu']}")
    lines.extend(f"problem: {problem}" for problem in doc.get("problems", []))
    return "\n".join(lines)


@main.command()
@_config_option
@click.option("--stun", "stun", multiple=True, help="STUN server HOST:PORT (repeatable).")
@click.option("--port", type=int, default=None, help="WireGuard listen port (default 51820).")
@click.option(
    "--relay",
    "relay_flags",
    multiple=True,
    help="Relay ID=HOST:PORT to ping (repeatable; default: the gateway's relays).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The agent's state dir (its device token lists the gateway's relays).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def netcheck(
    config_file: Path | None,
    stun: tuple[str, ...],
    port: int | None,
    relay_flags: tuple[str, ...],
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Find the NAT type and the reflexive address of the WireGuard port (needs CAP_NET_RAW),
    and ping each relay."""
    from relay.endpoints import parse_relays
    from wiregate.net import parse_hostport

    settings = _settings(
        AgentSettings, config_file, stun_servers=list(stun), listen_port=port, state_dir=state_dir
    )
    if not settings.stun_servers:
        raise click.UsageError("no STUN server: give --stun HOST:PORT or set agent.stun_servers")
    try:
        relays = parse_relays(relay_flags)
    except WiregateError as exc:
        raise click.UsageError(f"--relay: {exc.message}") from exc
    try:
        servers = [parse_hostport(s, what="STUN server") for s in settings.stun_servers]
        report = run_or_exit(_netcheck(settings, servers, relays))
    except (WiregateError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    doc = report.to_dict()
    click.echo(json.dumps(doc, indent=2) if as_json else _format_netcheck(doc))


async def _netcheck(
    settings: AgentSettings, servers: list[tuple[str, int]], relays: tuple[RelayEndpoint, ...]
) -> NetReport:
    from agent.discovery.netcheck import run_netcheck

    if not relays:
        relays = await _gateway_relays(settings)
    return await run_netcheck(servers, settings.listen_port, relays=relays)


async def _gateway_relays(settings: AgentSettings) -> tuple[RelayEndpoint, ...]:
    """The gateway's relays, asked with the agent's device token; none (and a note) if not."""
    from agent.discovery.netcheck import fetch_relays
    from agent.gateway_client import server_urls
    from agent.state import StateDir

    try:
        enrollment = StateDir(settings.state_dir).load_enrollment()
        if enrollment is None:
            click.echo("relays: not enrolled; give --relay ID=HOST:PORT to ping relays", err=True)
            return ()
        return await fetch_relays(server_urls(settings.server)[0], enrollment.token)
    except OSError as exc:
        click.echo(f"relays: cannot read the device token: {exc.strerror}", err=True)
    except WiregateError as exc:
        click.echo(f"relays: {exc.message}", err=True)
    return ()


def _format_netcheck(doc: dict[str, Any]) -> str:
    lines = [
        f"nat type   {doc['nat_type']}",
        f"reflexive  {doc['reflexive'] or '-'}",
        f"local      {doc['local'] or '-'}",
        f"evidence   {doc['evidence']}",
        "",
        f"{'STUN SERVER':<24} {'REACHABLE':<10} {'MAPPED':<24} {'RTT':>10}",
    ]
    for s in doc["servers"]:
        rtt = "-" if s["rtt_ms"] is None else f"{s['rtt_ms']:.1f}ms"
        reach = "yes" if s["reachable"] else "no"
        lines.append(f"{s['server']:<24} {reach:<10} {s['mapped'] or '-':<24} {rtt:>10}")
    if doc.get("relays"):
        lines += ["", f"{'RELAY':<16} {'CONTROL':<32} {'REACHABLE':<10} {'RTT':>10}  ERROR"]
    for r in doc.get("relays", []):
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f}ms"
        reach = "yes" if r["reachable"] else "no"
        lines.append(f"{r['id']:<16} {r['control']:<32} {reach:<10} {rtt:>10}  {r['error']}")
    return "\n".join(lines)


main.add_command(admin)
main.add_command(rotate)
main.add_command(policy)
main.add_command(backup)
main.add_command(restore)

"""This host's verbs: ``wiregate login``, ``wiregate status`` and ``wiregate netcheck``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wiregate.cli.admin import run_or_exit
from wiregate.cli.options import config_option, settings_or_exit
from wiregate.errors import WiregateError
from wiregate.settings import AgentSettings

if TYPE_CHECKING:  # imported lazily at run time: the CLI starts fast
    from agent.discovery.netcheck import NetReport
    from agent.state import Enrollment
    from relay.endpoints import RelayEndpoint

__all__ = [
    "device_login",
    "format_host_traffic",
    "format_netcheck",
    "format_status",
    "login",
    "netcheck",
    "status",
]


@click.command()
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
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="WIREGATE_CA_FILE",
    help="PEM CA trusted for the gateway's HTTPS.",
)
def login(
    server: str, state_dir: Path, hostname: str | None, as_json: bool, ca_file: Path | None
) -> None:
    """Enroll this host by device login: show a code, wait for a person to approve it."""

    def out(line: str) -> None:
        click.echo(line, err=as_json)

    enrollment = device_login(server, state_dir, hostname, ca_file, out)
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


def device_login(
    server: str,
    state_dir: Path,
    hostname: str | None,
    ca_file: Path | None,
    out: Callable[[str], None],
) -> Enrollment:
    """Device login (``wiregate login``, ``wiregate up``): the key is created in
    ``state_dir``, the code shown through ``out``; the saved enrollment returned."""
    import socket

    import aiohttp

    from agent.gateway_client import ControlClient, connector
    from agent.login import login as login_flow
    from agent.state import StateDir

    async def go() -> Enrollment:
        async with aiohttp.ClientSession(connector=connector(ca_file)) as session:
            client = ControlClient(server, session)
            name = hostname or socket.gethostname().split(".")[0]
            return await login_flow(
                client, StateDir(state_dir), name, sleep=asyncio.sleep, out=out, server=server
            )

    return run_or_exit(go())


@click.command()
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
    click.echo(format_status(doc))


def _expiry(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def format_status(doc: dict[str, Any]) -> str:
    dev, gw = doc.get("device", {}), doc.get("gateway", {})
    state = "connected" if gw.get("connected") else f"disconnected ({gw.get('last_error', '')})"
    addresses = " ".join(dev.get("addresses", []))
    lines = [
        f"device    {dev.get('name', '?')} ({dev.get('id', '?')})  {addresses}",
        f"key       {dev.get('public_key', '?')}  expires {_expiry(dev.get('expires_at'))}",
        f"interface {doc.get('interface')} [{doc.get('backend')}]"
        + ("  down (`wiregate up` brings it back)" if doc.get("state") == "down" else ""),
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
            if path.get("state") == "relayed_tcp":  # carried over TLS/TCP 443
                kind += "/tcp"
        lines.append(
            f"{p['name'][:20]:<20} {addr:<16} {kind[:14]:<14} {p.get('endpoint') or '-'!s:<24} "
            f"{age:>10} {p.get('rx_bytes', 0):>10} {p.get('tx_bytes', 0):>10}"
        )
        if path.get("reason"):
            lines.append(f"{'':<20} why: {path['reason']}")
        if p.get("path_mtu"):
            lines.append(f"{'':<20} path MTU {p['path_mtu']}")
    lines.extend(format_host_traffic(doc.get("host_traffic")))
    lines.extend(_format_pods(doc.get("pods")))
    lines.extend(f"problem: {problem}" for problem in doc.get("problems", []))
    return "\n".join(lines)


def _format_pods(doc: dict[str, Any] | None) -> list[str]:
    """The pod identity line (``kubernetes = true``): the node's pods reported."""
    if not doc:
        return []
    line = f"pods: {doc['reported']} reported ({doc['messages']} messages, {doc['lists']} lists)"
    return ["", line + (": REFUSED by the gateway, reports off" if doc["refused"] else "")]


_HOST_STATES = {
    "encrypted": "encrypted (tunnel)",
    "held": "tunnel, waiting for a handshake (strict: never in clear)",
    "clear": "IN CLEAR (no fresh handshake: nonstrict fallback)",
    "exempt": "in clear by design (exempt: API server / gateway)",
}


def format_host_traffic(doc: dict[str, Any] | None) -> list[str]:
    """The ``host traffic`` lines of ``wiregate status``: each peer node's address and
    whether traffic to it is encrypted now; nothing when host traffic is off."""
    if not doc or doc.get("mode") == "off":
        return []
    counts = doc.get("counts", {})
    lines = [
        "",
        f"host traffic {doc['mode']}: {counts.get('encrypted', 0)} encrypted, "
        f"{counts.get('clear', 0)} in clear, {counts.get('held', 0)} waiting, "
        f"{counts.get('exempt', 0)} exempt; {doc.get('fallbacks', 0)} fallbacks to clear",
    ]
    for d in doc.get("destinations", []):
        state = _HOST_STATES.get(d["state"], d["state"])
        lines.append(f"  {d['address'].split('/')[0]:<18} {d['peer'][:20]:<20} {state}")
    return lines


@click.command()
@config_option
@click.option(
    "--server",
    default=None,
    help="Gateway URL asked for its relays (default: the one `wiregate login` used).",
)
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
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM CA trusted for the gateway's HTTPS (default: the agent's ca_file).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def netcheck(
    config_file: Path | None,
    server: str | None,
    stun: tuple[str, ...],
    port: int | None,
    relay_flags: tuple[str, ...],
    state_dir: Path | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Find the NAT type and the reflexive address of the WireGuard port (needs CAP_NET_RAW),
    and ping each relay."""
    from agent.state import with_saved_server
    from relay.endpoints import parse_relays
    from wiregate.net import parse_hostport

    settings = settings_or_exit(
        AgentSettings,
        config_file,
        stun_servers=list(stun),
        listen_port=port,
        state_dir=state_dir,
        ca_file=ca_file,
        server=server,
    )
    settings = with_saved_server(settings)  # no --server: the gateway `wiregate login` used
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
    click.echo(json.dumps(doc, indent=2) if as_json else format_netcheck(doc))


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
        server = server_urls(settings.server)[0]
        return await fetch_relays(server, enrollment.token, ca_file=settings.ca_file)
    except OSError as exc:
        click.echo(f"relays: cannot read the device token: {exc.strerror}", err=True)
    except WiregateError as exc:
        click.echo(f"relays: {exc.message}", err=True)
    return ()


def format_netcheck(doc: dict[str, Any]) -> str:
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

"""Questions about the mesh, answered by the running agent: ``wiregate ip``,
``wiregate whois`` and ``wiregate ping``; and ``wiregate completion``.

:func:`find_peer`, :func:`pick_addresses` and :func:`describe_path` are pure (over
the ``wiregate status`` document).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from wiregate.cli.admin import run_or_exit
from wiregate.cli.host import json_option, run_dir_option
from wiregate.cli.options import exit_with
from wiregate.errors import BadInput, NotFound, Unavailable, WiregateError

__all__ = [
    "PingReply",
    "completion",
    "describe_path",
    "find_peer",
    "ip",
    "pick_addresses",
    "ping",
    "whois",
]


def _bare(address: str) -> str:
    return address.split("/", 1)[0]


def find_peer(status: dict[str, Any], query: str) -> dict[str, Any]:
    """The peer of ``status`` named ``query``: its device id, its name or a tunnel IP."""
    peers: list[dict[str, Any]] = status.get("peers", [])
    for key in ("id", "address", "name"):
        found = [p for p in peers if _matches(p, key, query)]
        if len(found) > 1:
            raise BadInput(f"{query!r} names {len(found)} peers; give its id or address")
        if found:
            return found[0]
    raise NotFound(f"no peer {query!r} in this device's map (see `wiregate status`)")


def _matches(peer: dict[str, Any], key: str, query: str) -> bool:
    if key == "address":
        try:
            wanted = ipaddress.ip_address(query)
        except ValueError:
            return False
        return any(ipaddress.ip_address(_bare(a)) == wanted for a in peer.get("addresses", []))
    if key == "name":
        return str(peer.get("name", "")).lower() == query.lower()
    return peer.get(key) == query


def pick_addresses(addresses: list[str], family: int | None) -> list[str]:
    """Bare tunnel addresses, of one family (4 or 6) or all."""
    bare = [_bare(a) for a in addresses]
    return [a for a in bare if family is None or ipaddress.ip_address(a).version == family]


def describe_path(peer: dict[str, Any]) -> tuple[str, str]:
    """``(kind, text)`` of the path to ``peer`` now: ``direct to ENDPOINT``,
    ``relayed via RELAY (udp|tcp)``, or what its path machine is doing."""
    path = peer.get("path") or {}
    kind = str(path.get("path") or "unknown")
    if kind == "direct":
        return kind, f"direct to {peer.get('endpoint') or path.get('endpoint') or '?'}"
    if kind == "relayed":
        transport = "tcp" if path.get("state") == "relayed_tcp" else "udp"
        return kind, f"relayed via {path.get('relay') or '?'} ({transport})"
    return kind, f"{kind} (endpoint {peer.get('endpoint') or '-'})"


def _status(run_dir: Path) -> dict[str, Any]:
    from agent.status import fetch_status

    return run_or_exit(fetch_status(run_dir / "agent.sock"))


@click.command()
@click.option("-4", "family", flag_value=4, help="IPv4 only.")
@click.option("-6", "family", flag_value=6, help="IPv6 only.")
@click.argument("peer", required=False)
@run_dir_option
@json_option
def ip(family: int | None, peer: str | None, run_dir: Path, as_json: bool) -> None:
    """This device's tunnel addresses (or PEER's: a name, tunnel IP or device id)."""
    status = _status(run_dir)
    if peer is None:
        addresses = status.get("device", {}).get("addresses", [])
    else:
        addresses = _peer_or_exit(status, peer).get("addresses", [])
    picked = pick_addresses(addresses, family)
    if as_json:
        click.echo(json.dumps({"addresses": picked}, indent=2))
        return
    if not picked:
        exit_with(NotFound("no tunnel address yet (is the device enrolled?)"))
    click.echo("\n".join(picked))


def _peer_or_exit(status: dict[str, Any], query: str) -> dict[str, Any]:
    try:
        return find_peer(status, query)
    except WiregateError as exc:
        exit_with(exc)


@click.command()
@click.argument("address")
@run_dir_option
@json_option
def whois(address: str, run_dir: Path, as_json: bool) -> None:
    """Which device (name, owner, tags) holds a tunnel ADDRESS or routed prefix."""
    from urllib.parse import quote

    from agent.control import call_agent

    sock = run_dir / "agent.sock"
    doc = run_or_exit(call_agent(sock, "GET", f"/whois?address={quote(address, safe='')}"))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    dev = doc["device"]
    what = {"self": "this device", "tunnel": "tunnel address", "route": "routed prefix"}
    click.echo(
        "\n".join(
            [
                f"device   {dev['name']} ({dev['id']})",
                f"match    {doc.get('match')} ({what.get(doc['kind'], doc['kind'])})",
                f"owner    {_owner_line(doc)}",
                f"tags     {', '.join(dev['tags']) or '-'}",
                f"address  {' '.join(dev['addresses'])}",
                f"key      {dev['public_key']}",
            ]
        )
    )


def _owner_line(doc: dict[str, Any]) -> str:
    """``person Alice <alice@example.com> (subject 123, issuer https://idp, via corp)``,
    or why it is unknown."""
    owner = doc.get("owner")
    if not isinstance(owner, dict):
        return f"- ({doc.get('owner_note') or 'unknown'})"
    name, email, via = owner.get("name"), owner.get("email"), owner.get("via")
    who = str(name or owner.get("subject")) + (f" <{email}>" if email else "")
    about = [f"subject {owner.get('subject')}"] if name else []
    about += [f"issuer {owner.get('issuer')}", *([f"via {via}"] if via else [])]
    return f"{owner.get('kind')} {who} ({', '.join(about)})"


@dataclass(frozen=True, slots=True)
class PingReply:
    """One echo reply and the path it took."""

    seq: int
    address: str
    rtt_ms: float
    path: str  # direct | relayed | ...
    via: str  # "direct to 192.0.2.2:51820", "relayed via r1 (udp)"


@click.command()
@click.argument("peer")
@click.option("-c", "--count", type=click.IntRange(1, 10000), default=10, show_default=True,
              help="Stop after this many echo requests.")  # fmt: skip
@click.option("--until-direct/--no-until-direct", default=True, show_default=True,
              help="Stop at the first reply over a direct path.")  # fmt: skip
@click.option("--timeout", "wait", type=click.FloatRange(0.1, 60), default=2.0,
              show_default=True, help="Seconds to wait for each reply.")  # fmt: skip
@click.option("-6", "v6", is_flag=True, help="Ping the peer's IPv6 tunnel address.")
@run_dir_option
@json_option
def ping(
    peer: str, count: int, until_direct: bool, wait: float, v6: bool, run_dir: Path, as_json: bool
) -> None:
    """Ping PEER (name, tunnel IP or id) through the tunnel; show each reply's path and RTT."""
    status = _status(run_dir)
    target = _peer_or_exit(status, peer)
    name = str(target.get("name"))
    family = 6 if v6 or _ip_version(peer) == 6 else 4
    addresses = pick_addresses(target.get("addresses", []), family)
    if not addresses:
        exit_with(NotFound(f"{name} has no IPv{family} tunnel address"))
    replies = run_or_exit(
        _ping(run_dir, target, addresses[0], count, until_direct, wait, None if as_json else name)
    )
    if not replies:
        exit_with(Unavailable(f"no reply from {name} ({addresses[0]})"))
    direct = any(r.path == "direct" for r in replies)
    if as_json:
        doc = {"peer": name, "direct": direct, "replies": [asdict(r) for r in replies]}
        click.echo(json.dumps(doc, indent=2))
    if until_direct and not direct:  # like `tailscale ping`: exit 1 (the JSON says why)
        if not as_json:
            click.echo(f"direct connection not established after {count} pings", err=True)
        raise SystemExit(1)


def _ip_version(text: str) -> int | None:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


async def _ping(
    run_dir: Path,
    target: dict[str, Any],
    address: str,
    count: int,
    until_direct: bool,
    wait: float,
    show: str | None,
) -> list[PingReply]:
    """Echo requests to ``address``; after each reply the agent says which path it took."""
    from agent.status import fetch_status
    from wiregate.cli.icmp import EchoSocket

    sock = EchoSocket.open(address, ident=os.getpid())
    replies: list[PingReply] = []
    try:
        for seq in range(1, count + 1):
            rtt = await sock.echo(address, seq, wait)
            if rtt is None:
                if show:
                    click.echo(f"timeout from {show} ({address}) seq={seq}")
                continue
            status = await fetch_status(run_dir / "agent.sock")
            now = next((p for p in status.get("peers", []) if p.get("id") == target["id"]), target)
            kind, via = describe_path(now)
            reply = PingReply(seq, address, round(rtt * 1000, 3), kind, via)
            replies.append(reply)
            if show:
                click.echo(f"reply from {show} ({address}) seq={seq}: {via} in {reply.rtt_ms}ms")
            if until_direct and kind == "direct":
                break
            await asyncio.sleep(max(0.0, 0.5 - rtt))
    finally:
        sock.close()
    return replies


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    Install it with e.g. ``wiregate completion bash > /etc/bash_completion.d/wiregate``.
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # click ships bash, zsh and fish
    root = ctx.find_root().command
    click.echo(cls(root, {}, "wiregate", "_WIREGATE_COMPLETE").source())

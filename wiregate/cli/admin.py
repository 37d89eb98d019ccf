"""``wiregate admin``: enrollment keys and devices, over the gateway's admin socket or API."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import click

from wiregate.cli import admin_paths, admin_policy, admin_report
from wiregate.cli.admin_client import AdminClient
from wiregate.cli.options import config_option, exit_with
from wiregate.errors import WiregateError
from wiregate.settings import ADMIN_SOCKET, GatewaySettings, load_settings

__all__ = ["admin", "admin_client", "parse_duration", "run_or_exit"]

T = TypeVar("T")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds."""
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 1h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def run_or_exit(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn wiregate errors into a clear message and exit code 1."""
    try:
        return asyncio.run(coro)
    except WiregateError as exc:
        exit_with(exc)  # JSON under --json
    except KeyboardInterrupt:
        sys.exit(130)


def _call(ctx: click.Context, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    client: AdminClient = ctx.obj
    return run_or_exit(client.call(method, path, body))


def _echo(data: Any, as_json: bool, rows: list[str]) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else "\n".join(rows))


@click.group()
@config_option
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="WIREGATE_ADMIN_SOCKET",
    default=None,
    help=f"Admin socket (default: the config's admin_socket, else {ADMIN_SOCKET}).",
)
@click.option("--server", envvar="WIREGATE_SERVER", help="Gateway URL (instead of the socket).")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Admin bearer token for --server (default: the config's admin_token_file).",
)
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False),
              envvar="WIREGATE_CA_FILE", help="PEM CA trusted for an https --server.")  # fmt: skip
@click.pass_context
def admin(
    ctx: click.Context,
    config_file: Path | None,
    socket_path: Path | None,
    server: str | None,
    token_file: Path | None,
    ca_file: Path | None,
) -> None:
    """Administer enrollment keys, devices and device-login requests.

    With --config (the gateway's own TOML file), its admin_socket is the socket;
    when that socket is not there and the file names public_url and
    admin_token_file, the admin API is called over HTTP(S) with that token."""
    ctx.obj = admin_client(config_file, socket_path, server, token_file, ca_file)


def admin_client(
    config_file: Path | None,
    socket_path: Path | None,
    server: str | None,
    token_file: Path | None,
    ca_file: Path | None,
) -> AdminClient:
    """The client the ``admin`` group's options name (exit with a message if they cannot)."""
    if config_file is not None:
        try:
            gw = load_settings(GatewaySettings, config_file)
        except WiregateError as exc:
            exit_with(exc)
        socket_path = socket_path or gw.admin_socket
        token_file = token_file or gw.admin_token_file
        if server is None and not socket_path.exists() and gw.public_url and token_file:
            server = gw.public_url
    sock = None if server else (socket_path or ADMIN_SOCKET)
    try:
        return AdminClient(socket=sock, server=server, token_file=token_file, ca_file=ca_file)
    except WiregateError as exc:
        exit_with(exc)


@admin.group()
def keys() -> None:
    """Enrollment keys (the secret is shown once, at creation)."""


@keys.command("create")
@click.option("--tags", default="", help="Comma-separated tags, e.g. tag:vm,tag:db.")
@click.option("--expiry", default="1h", help="Lifetime: 30m, 1h, 7d …")
@click.option("--reusable", is_flag=True, help="Allow many enrollments with this key.")
@click.option("--ephemeral", is_flag=True, help="Devices are removed when they go away.")
@click.option("--description", default="")
@click.option("--device-key-expiry", default=None, help="Key lifetime of its devices: 90d …")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_create(
    ctx: click.Context,
    tags: str,
    expiry: str,
    reusable: bool,
    ephemeral: bool,
    description: str,
    device_key_expiry: str | None,
    as_json: bool,
) -> None:
    """Create an enrollment key; print its secret once."""
    body = {
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
        "expiry": parse_duration(expiry),
        "reusable": reusable,
        "ephemeral": ephemeral,
        "description": description,
    }
    if device_key_expiry is not None:
        body["device_key_expiry"] = parse_duration(device_key_expiry)
    data = _call(ctx, "POST", "/api/v1/keys", body)
    key = data["key"]
    _echo(data, as_json, [data["secret"]])
    if not as_json:  # to stderr, so that `… keys create > key-file` holds the secret alone
        click.echo(f"# id {key['id']}, expires {key['expires_at']}", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """List enrollment keys (never their secrets)."""
    data = _call(ctx, "GET", "/api/v1/keys")
    rows = [f"{'ID':<24} {'TAGS':<24} {'REUSABLE':<9} {'USED':>5} {'EXPIRES':<26} REVOKED"]
    for k in data["keys"]:
        rows.append(
            f"{k['id']:<24} {','.join(k['tags']):<24} {k['reusable']!s:<9} "
            f"{k['used_count']:>5} {k['expires_at']:<26} {k['revoked']}"
        )
    _echo(data, as_json, rows)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke an enrollment key."""
    _call(ctx, "DELETE", f"/api/v1/keys/{key_id}")
    click.echo(f"revoked {key_id}")


@admin.group()
def devices() -> None:
    """Enrolled devices."""


@devices.command("list")
@click.option("--tag", "tags", multiple=True, help="Only devices with this tag (repeatable).")
@click.option("--online/--offline", default=None, help="Only devices online (or offline).")
@click.option("--owner", default=None, help="Only devices whose identity has this subject.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def devices_list(
    ctx: click.Context, tags: tuple[str, ...], online: bool | None, owner: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """List devices: name, addresses, tags, owner, online, last seen, key expiry."""
    query = [("tag", t) for t in tags]
    if owner is not None:
        query.append(("owner", owner))
    if online is not None:
        query.append(("online", "true" if online else "false"))
    data = _call(ctx, "GET", "/api/v1/devices" + (f"?{urlencode(query)}" if query else ""))
    rows = [f"{'ID':<21} {'NAME':<20} {'ADDRESSES':<34} {'TAGS':<20} {'OWNER':<24} "
            f"{'ONLINE':<7} {'LAST SEEN':<21} EXPIRES"]  # fmt: skip
    rows += [_device_row(d) for d in data["devices"]]
    _echo(data, as_json, rows)


def _device_row(d: dict[str, Any]) -> str:
    owner = d["identity"]["subject"]
    return (
        f"{d['id']:<21} {d['name'][:20]:<20} {' '.join(d['addresses']):<34} "
        f"{','.join(d['tags']) or '-':<20} {owner[:24]:<24} "
        f"{'yes' if d.get('online') else 'no':<7} {(d.get('last_seen') or '-')[:20]:<21} "
        f"{d.get('expires_at') or 'never'}"
    )


def _device_id(ctx: click.Context, ref: str) -> str:
    """A device named by its id (``dev_…``) or by its name."""
    if ref.startswith("dev_"):
        return ref
    found = [d["id"] for d in _call(ctx, "GET", "/api/v1/devices")["devices"] if d["name"] == ref]
    if not found:
        raise click.UsageError(f"no device is called {ref!r} (give its name or its dev_ id)")
    return str(found[0])


def _device_path(ctx: click.Context, ref: str, action: str = "") -> str:
    return f"/api/v1/devices/{quote(_device_id(ctx, ref), safe='')}{action}"


@devices.command("rename")
@click.argument("device")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def devices_rename(ctx: click.Context, device: str, name: str, as_json: bool) -> None:
    """Rename DEVICE (its id or name) to NAME, a DNS label no other device has."""
    data = _call(ctx, "PATCH", _device_path(ctx, device), {"name": name})
    new = data["device"]
    _echo(data, as_json, [f"renamed {new['id']} to {new['name']} (map v{data['map_version']})"])


@devices.command("tag")
@click.argument("device")
@click.argument("tags", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def devices_tag(ctx: click.Context, device: str, tags: tuple[str, ...], as_json: bool) -> None:
    """Replace the tags of DEVICE by TAGS (none: remove them all); the policy decides its
    peers again."""
    wanted = [t for arg in tags for t in arg.replace(",", " ").split()]
    data = _call(ctx, "PATCH", _device_path(ctx, device), {"tags": wanted})
    new = data["device"]
    shown = ",".join(new["tags"]) or "no tags"
    line = f"tagged {new['name']} ({new['id']}): {shown} (map v{data['map_version']})"
    _echo(data, as_json, [line])


@devices.command("expire")
@click.argument("device")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def devices_expire(ctx: click.Context, device: str, as_json: bool) -> None:
    """Expire the key of DEVICE now: every peer drops it and its agent is told."""
    data = _call(ctx, "POST", _device_path(ctx, device, "/expire"))
    _echo(data, as_json, [f"expired {data['device_id']} (map v{data['map_version']})"])


@devices.command("show")
@click.argument("device_id")
@click.pass_context
def devices_show(ctx: click.Context, device_id: str) -> None:
    """Show one device as JSON."""
    click.echo(json.dumps(_call(ctx, "GET", f"/api/v1/devices/{device_id}"), indent=2))


@devices.command("remove")
@click.argument("device_id")
@click.pass_context
def devices_remove(ctx: click.Context, device_id: str) -> None:
    """Remove a device: every peer drops it and its agent tears down."""
    _call(ctx, "DELETE", f"/api/v1/devices/{device_id}")
    click.echo(f"removed {device_id}")


@admin.group("login")
def login_requests() -> None:
    """Device-login requests (``wiregate login``), named by their user code."""


def _login_rows(login: dict[str, Any]) -> list[str]:
    return [
        f"name         {login['name']}",
        f"fingerprint  {login['fingerprint']}",
        f"status       {login['status']}",
        f"created      {login['created_at']}",
        f"expires      {login['expires_at']}",
        f"request      {login['request_id']}",
    ]


def _code_path(code: str, action: str = "") -> str:
    return f"/api/v1/login/requests/{quote(code.strip(), safe='')}{action}"


@login_requests.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def login_list(ctx: click.Context, as_json: bool) -> None:
    """List the login requests waiting for approval (approving needs the device's code)."""
    data = _call(ctx, "GET", "/api/v1/login/requests")
    rows = [f"{'REQUEST':<24} {'NAME':<24} {'FINGERPRINT':<40} EXPIRES"]
    for r in data["requests"]:
        rows.append(f"{r['request_id']:<24} {r['name'][:24]:<24} {r['fingerprint']:<40} "
                    f"{r['expires_at']}")  # fmt: skip
    _echo(data, as_json, rows)


@login_requests.command("show")
@click.argument("code")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def login_show(ctx: click.Context, code: str, as_json: bool) -> None:
    """Show the pending request CODE names: compare its fingerprint with the device's."""
    data = _call(ctx, "GET", _code_path(code))
    _echo(data, as_json, _login_rows(data))


@login_requests.command("approve")
@click.argument("code")
@click.option("--as", "as_name", default=None,
              help="Approve as this administrator (in the audit log); alone, the device "
              "belongs to the identity (wiregate:admin, NAME).")  # fmt: skip
@click.option("--issuer", default=None, help="The approved identity's OIDC issuer.")
@click.option("--subject", default=None, help="The approved identity's subject.")
@click.option("--tags", default="", help="Comma-separated tags, e.g. tag:laptop,tag:dev.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def login_approve(
    ctx: click.Context, code: str, as_name: str | None, issuer: str | None,
    subject: str | None, tags: str, as_json: bool,
) -> None:  # fmt: skip
    """Approve request CODE as a named administrator (--as NAME) and/or for an identity
    (--issuer and --subject): its device is enrolled."""
    if (issuer is None) != (subject is None):
        raise click.UsageError("give --issuer and --subject together")
    if issuer is None and as_name is None:
        raise click.UsageError("give --as NAME, or --issuer and --subject")
    body: dict[str, Any] = {"tags": [t.strip() for t in tags.split(",") if t.strip()]}
    if issuer is not None:
        body.update(issuer=issuer, subject=subject)
    if as_name is not None:
        body["as"] = as_name
    data = _call(ctx, "POST", _code_path(code, "/approve"), body)
    device = data["device"]
    rows = [
        f"approved {data['login']['name']}: device {device['id']} "
        f"{' '.join(device['addresses'])} (map v{data['map_version']})"
    ]
    _echo(data, as_json, rows)


@login_requests.command("deny")
@click.argument("code")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def login_deny(ctx: click.Context, code: str, as_json: bool) -> None:
    """Deny request CODE: the device's next poll says denied."""
    data = _call(ctx, "POST", _code_path(code, "/deny"))
    _echo(data, as_json, [f"denied {data['name']} ({data['request_id']})"])


@admin.command("audit")
@click.option("--since", default=None, help="RFC 3339 time or POSIX seconds.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit(ctx: click.Context, since: str | None, limit: int, as_json: bool) -> None:
    """The audit log, newest first: who did what to what."""
    query = f"?limit={limit}" + (f"&since={quote(since, safe='')}" if since else "")
    data = _call(ctx, "GET", f"/api/v1/audit{query}")
    rows = [f"{'AT':<28} {'ACTOR':<32} {'ACTION':<20} {'TARGET':<24} DETAIL"]
    for e in data["events"]:
        detail = " ".join(f"{k}={v}" for k, v in sorted(e["detail"].items()))
        rows.append(f"{e['at']:<28} {e['actor']:<32} {e['action']:<20} {e['target']:<24} {detail}")
    _echo(data, as_json, rows)


@admin.group()
def identities() -> None:
    """Identities (OIDC users, enrollment keys) and everything they own."""


@identities.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def identities_list(ctx: click.Context, as_json: bool) -> None:
    """List identities with their device counts."""
    data = _call(ctx, "GET", "/api/v1/identities")
    rows = [f"{'ID':>6} {'DISABLED':<9} {'DEVICES':>7}  ISSUER # SUBJECT"]
    for i in data["identities"]:
        rows.append(
            f"{i['id']:>6} {i['disabled']!s:<9} {i['devices']:>7}  {i['issuer']} # {i['subject']}"
        )
    _echo(data, as_json, rows)


def _identity_ref(
    ctx: click.Context, ref: str | None, issuer: str | None, subject: str | None
) -> int:
    if ref is not None and ref.isdigit():
        return int(ref)
    if issuer is None or subject is None:
        raise click.UsageError("give an identity ID, or --issuer and --subject")
    query = f"?issuer={quote(issuer, safe='')}&subject={quote(subject, safe='')}"
    found = _call(ctx, "GET", f"/api/v1/identities{query}")
    return int(found["identities"][0]["id"])


def _identity_command(name: str, method: str, action: str, summary: str) -> None:
    @identities.command(name, help=summary)
    @click.argument("identity_id", required=False)
    @click.option("--issuer", help="The identity's issuer (with --subject, instead of an ID).")
    @click.option("--subject", help="The identity's subject.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def command(
        ctx: click.Context,
        identity_id: str | None,
        issuer: str | None,
        subject: str | None,
        as_json: bool,
    ) -> None:
        ident = _identity_ref(ctx, identity_id, issuer, subject)
        data = _call(ctx, method, f"/api/v1/identities/{ident}{action}")
        who = data["identity"]
        removed = ", ".join(data["removed"]) or "no device"
        _echo(data, as_json, [f"{name}d {who['issuer']} # {who['subject']}: removed {removed}"])


_identity_command("revoke", "DELETE", "", "Revoke an identity: all its devices leave every map.")
_identity_command(
    "disable", "POST", "/disable", "Disable an identity: its devices go, no new ones."
)
_identity_command("enable", "POST", "/enable", "Enable a disabled identity again.")
admin.add_command(admin_policy.policy)
admin.add_command(admin_report.report)
admin.add_command(admin_paths.paths)

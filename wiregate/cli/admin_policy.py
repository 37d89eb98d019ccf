"""``wiregate admin policy``: the policy in force on every replica: get, set, reset.

``set FILE`` sends the file to ``PUT /api/v1/policy``: the gateway validates it (every
field, then its ``tests``) and refuses it in one line, the old policy left in force;
an accepted one is applied by every replica without a restart and stays in force
over the policy files until ``reset``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from wiregate.cli.admin_client import AdminClient
from wiregate.cli.options import exit_with
from wiregate.errors import ConfigError, WiregateError

__all__ = ["policy"]

_PATH = "/api/v1/policy"
_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def _call(ctx: click.Context, method: str, body: dict[str, Any] | None = None) -> Any:
    client: AdminClient = ctx.obj  # set by the `wiregate admin` group
    try:
        return asyncio.run(client.call(method, _PATH, body))
    except WiregateError as exc:
        exit_with(exc)


def _describe(policy: dict[str, Any]) -> str:
    who = f", set by {policy['set_by']} at {policy['set_at']}" if policy.get("set_by") else ""
    return f"source {policy['source']}, sha256 {policy['hash']}, map v{policy['version']}{who}"


def _changed(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif data["changed"]:
        was = data["previous_hash"] or "none"
        click.echo(f"policy in force: {_describe(data['policy'])} (was {was})")
    else:
        click.echo(f"unchanged: that policy is in force already ({_describe(data['policy'])})")


def _read(file: Path) -> tuple[str, str]:
    fmt = _FORMATS.get(file.suffix)
    if fmt is None:
        raise ConfigError(f"{file}: the policy is sent as YAML (.yaml, .yml) or JSON (.json)")
    try:
        return file.read_bytes().decode("utf-8"), fmt
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{file} is not UTF-8 text") from None


@click.group("policy")
def policy() -> None:
    """The policy in force on every replica (a file change or SIGHUP reloads the file)."""


@policy.command("get")
@click.option("--json", "as_json", is_flag=True, help="The document and where it came from.")
@click.pass_context
def policy_get(ctx: click.Context, as_json: bool) -> None:
    """Print the document in force (stdout) and where it came from (stderr)."""
    data = _call(ctx, "GET")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(data["policy"]["document"], nl=False)
    click.echo(f"# {_describe(data['policy'])}", err=True)


@policy.command("set")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_set(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Validate FILE on the gateway and put it in force on every replica."""
    try:
        text, fmt = _read(file)
    except WiregateError as exc:
        exit_with(exc)
    _changed(_call(ctx, "PUT", {"document": text, "format": fmt}), as_json)


@policy.command("reset")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_reset(ctx: click.Context, as_json: bool) -> None:
    """Drop the policy put in force with 'set': the policy file is in force again."""
    _changed(_call(ctx, "DELETE"), as_json)

"""``wiregate backup`` and ``wiregate restore``: the gateway's store to a file and back.

Both read the gateway's configuration (``--config``, ``WIREGATE_…`` variables)
for the database URL, so a PostgreSQL password stays out of the command line.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wiregate.cli.admin import run_or_exit
from wiregate.errors import WiregateError
from wiregate.logging import configure_logging
from wiregate.settings import GatewaySettings, load_settings

if TYPE_CHECKING:  # the store is loaded only when a backup or restore runs
    from gateway.store.backup import Snapshot

__all__ = ["backup", "restore"]

_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="WIREGATE_CONFIG",
    help="The gateway's TOML configuration file (for its database).",
)


def _gateway_settings(config_file: Path | None) -> GatewaySettings:
    try:
        settings = load_settings(GatewaySettings, config_file)
    except WiregateError as exc:
        raise click.ClickException(exc.message) from exc
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _counts(snapshot: Snapshot) -> str:
    return ", ".join(f"{name} {count}" for name, count in snapshot.counts().items())


@click.command()
@_config_option
@click.option(
    "--out",
    metavar="FILE",
    help="Backup file, created 0600 (replaced atomically if it exists); '-' for stdout. "
    "Default: wiregate-backup-<UTC time>.jsonl in the current directory.",
)
def backup(config_file: Path | None, out: str | None) -> None:
    """Write a consistent snapshot of the store to a file, while the gateway runs.

    Everything durable is in it (devices, identities, enrollment keys, logins,
    audit log, map version); device tokens and enrollment secrets only as
    hashes. Treat the file as a credential store all the same.
    """
    from gateway.store.backup import backup_database

    settings = _gateway_settings(config_file)
    now = time.time()
    target = sys.stdout.buffer if out == "-" else Path(out or _default_name(now))
    url = settings.effective_database_url()
    snapshot = run_or_exit(backup_database(url, target, now))
    where = "stdout" if out == "-" else str(target)
    click.echo(
        f"backup written to {where}: schema {snapshot.revision}, {snapshot.dialect}, "
        f"map version {snapshot.map_version}; rows: {_counts(snapshot)}",
        err=True,
    )


def _default_name(now: float) -> str:
    return time.strftime("wiregate-backup-%Y%m%dT%H%M%SZ.jsonl", time.gmtime(now))


@click.command()
@_config_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--replace", is_flag=True, help="Discard what the store holds now.")
def restore(config_file: Path | None, file: Path, replace: bool) -> None:
    """Restore the store from FILE, written by wiregate backup.

    Stop the gateway first (every replica): restore refuses while the admin
    socket answers and, on PostgreSQL, while other sessions use the database.
    The database is migrated to the current schema, the backup (of this schema
    or an older one) is loaded in one transaction, and the map version moves
    past any version agents hold, so each gets a full map when it reconnects.
    A store that is not empty is refused unless --replace.
    """
    from gateway.store.backup import restore_database

    settings = _gateway_settings(config_file)
    _refuse_running_gateway(settings.admin_socket)
    snapshot = _load(file)
    _refuse_other_pools(snapshot, settings)
    if (
        not settings.database_url
    ):  # the default SQLite file, in a state dir made as the gateway would
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url = settings.effective_database_url()
    restored = run_or_exit(restore_database(url, snapshot, replace=replace))
    migrated = f", migrated from schema {restored.migrated_from}" if restored.migrated_from else ""
    click.echo(
        f"restored {file} (taken {snapshot.created_at} on {snapshot.dialect}){migrated}: "
        f"rows: {_counts(snapshot)}; map version {snapshot.map_version} -> {restored.map_version}",
        err=True,
    )


def _load(file: Path) -> Snapshot:
    from gateway.store.backup import BackupError, read_backup

    try:
        snapshot = read_backup(file)
        snapshot.meta()  # the map version and pools are there
    except BackupError as exc:
        hint = f"\nhint: {exc.hint}" if exc.hint else ""
        raise click.ClickException(exc.message + hint) from exc
    return snapshot


def _refuse_running_gateway(path: Path) -> None:
    """A gateway serving its admin socket would keep its own idea of the store: refuse."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return  # no socket, or a stale one nobody listens on
    raise click.ClickException(
        f"the gateway is running (its admin socket {path} answers); stop it first"
    )


def _refuse_other_pools(snapshot: Snapshot, settings: GatewaySettings) -> None:
    meta = snapshot.meta()
    pools = (meta.get("ipv4_pool"), meta.get("ipv6_pool"))
    if pools != (settings.ipv4_pool, settings.ipv6_pool):
        raise click.ClickException(
            f"the backup's address pools are {pools[0]}, {pools[1]}; configured: "
            f"{settings.ipv4_pool}, {settings.ipv6_pool}\n"
            "hint: devices keep their addresses: configure the backup's pools"
        )

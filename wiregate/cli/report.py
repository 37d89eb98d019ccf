"""``wiregate report``: the evidence report, a top-level name for ``wiregate admin report``.

The same options as ``wiregate admin`` (how to reach the gateway) and as ``admin
report`` (the period, the maximum key age, ``--json``), the same output.
"""

from __future__ import annotations

from typing import Any

import click

from wiregate.cli.admin import admin, admin_client
from wiregate.cli.admin_report import report as admin_report

__all__ = ["report"]

_CONNECTION = ("config_file", "socket_path", "server", "token_file", "ca_file")


@click.pass_context
def _run(ctx: click.Context, /, **options: Any) -> None:
    ctx.obj = admin_client(*(options.pop(name) for name in _CONNECTION))
    ctx.invoke(admin_report, **options)


report = click.Command(
    "report",
    callback=_run,
    params=[*admin.params, *admin_report.params],
    help=admin_report.help,
    short_help="The evidence report (as wiregate admin report).",
)

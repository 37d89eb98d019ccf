"""The ``wiregate`` command: one group, its verbs in one module per verb group.

- :mod:`wiregate.cli.serve`: ``gateway``, ``relay``, ``agent`` (the processes);
- :mod:`wiregate.cli.device`: ``login``, ``status``, ``netcheck`` (this host);
- :mod:`wiregate.cli.host`: ``up``, ``down``, ``logout``; :mod:`wiregate.cli.lookup`:
  ``ip``, ``whois``, ``ping``, ``completion``;
- :mod:`wiregate.cli.rotate`: ``rotate``; :mod:`wiregate.cli.admin`: ``admin …``;
  :mod:`wiregate.cli.report`: ``report`` (as ``admin report``);
- :mod:`wiregate.cli.policy`: ``policy check``; :mod:`wiregate.cli.backup`:
  ``backup``, ``restore``.
"""

from __future__ import annotations

import click

from wiregate.cli.admin import admin
from wiregate.cli.backup import backup, restore
from wiregate.cli.device import login, netcheck, status
from wiregate.cli.host import down, logout, up
from wiregate.cli.lookup import completion, ip, ping, whois
from wiregate.cli.output import JsonErrorGroup
from wiregate.cli.policy import policy
from wiregate.cli.report import report
from wiregate.cli.rotate import rotate
from wiregate.cli.serve import agent, gateway, relay
from wiregate.cli.wheelhouse import wheelhouse

__all__ = ["main"]


@click.group(cls=JsonErrorGroup)  # --json: errors as JSON too
@click.version_option(package_name="wiregate")
def main() -> None:
    """wiregate: a WireGuard mesh for Kubernetes nodes, VMs and people, with OIDC identity."""


for _command in (gateway, relay, agent, login, status, netcheck):
    main.add_command(_command)
for _command in (admin, report, rotate, policy, backup, restore, wheelhouse):
    main.add_command(_command)
for _command in (up, down, logout, ip, whois, ping, completion):
    main.add_command(_command)

"""``wiregate admin paths``: the fleet's path matrix as text (``GET /api/v1/paths``).

Rows are the reporting devices, columns their peers; a cell is the path MTU the
row's agent measured toward the column (``-``: not probed yet), marked ``r`` when
the pair is relayed and ``!`` when the probe met a black hole (a size lost without
"fragmentation needed"). Below the matrix, every black hole and every stale report
is listed with its reason. ``--json`` prints the gateway's JSON; ``--device`` keeps
the pairs one device is part of. The same data as the console's ``/admin/paths``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import click

from wiregate.cli.admin_client import AdminClient
from wiregate.cli.options import exit_with
from wiregate.errors import WiregateError

__all__ = ["paths", "render_matrix"]


def _cell(p: dict[str, Any]) -> str:
    mtu = "-" if p["path_mtu"] is None else str(p["path_mtu"])
    return mtu + ("r" if p["path"] == "relayed" else "") + ("!" if p["black_hole"] else "")


def render_matrix(data: dict[str, Any]) -> str:
    """The matrix and the notes under it, from the API's JSON."""
    pairs: list[dict[str, Any]] = data["paths"]
    if not pairs:
        return "no path reports yet"
    names = {p["reporter"]["id"]: p["reporter"]["name"] for p in pairs}
    names |= {p["peer"]["id"]: p["peer"]["name"] for p in pairs}
    order = sorted(names, key=lambda i: (names[i], i))
    cells = {(p["reporter"]["id"], p["peer"]["id"]): _cell(p) for p in pairs}
    width = max(8, *(len(names[i]) + 1 for i in order))
    rows = ["path MTU by pair (row: reporter, column: peer; r relayed, ! black hole)"]
    rows.append(f"{'':<{width}}" + "".join(f"{names[i][: width - 1]:>{width}}" for i in order))
    for a in order:
        line = "".join(f"{'·' if a == b else cells.get((a, b), ''):>{width}}" for b in order)
        rows.append(f"{names[a]:<{width}}" + line)
    notes = [
        f"  {p['reporter']['name']} -> {p['peer']['name']}: "
        + ("black hole" if p["black_hole"] else f"stale report ({p['age']:.0f} s old)")
        + f"; {p['path']}, {p['reason']}"
        for p in pairs
        if p["black_hole"] or p["stale"]
    ]
    return "\n".join(rows + (["", *notes] if notes else []))


@click.command("paths")
@click.option("--device", default=None, help="Only pairs this device id is part of.")
@click.option("--json", "as_json", is_flag=True, help="The gateway's JSON.")
@click.pass_context
def paths(ctx: click.Context, device: str | None, as_json: bool) -> None:
    """The fleet's paths: path MTU, relayed pairs and black holes, devices by devices."""
    query = "" if device is None else "?" + urlencode({"device": device})
    client: AdminClient = ctx.obj  # set by the `wiregate admin` group
    try:
        data = asyncio.run(client.call("GET", "/api/v1/paths" + query))
    except WiregateError as exc:
        exit_with(exc)
    click.echo(json.dumps(data, indent=2) if as_json else render_matrix(data))

"""``wiregate admin report``: the evidence report of a period (``GET /api/v1/report``).

Human text by default (verdicts first, each with the data it rests on), the
gateway's JSON with ``--json``. The exit status is 0 whatever the verdicts say: the
report is evidence, not a gate (read ``verdicts[].result`` from the JSON for that).
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

__all__ = ["render_text", "report"]


def _sources(items: list[dict[str, Any]]) -> list[str]:
    out = []
    for s in items:
        count = "" if s["count"] is None else f": {s['count']}"
        when = f", as of {s['as_of']}" if s["as_of"] else ""
        out.append(f"      rests on: {s['data']}{count}{when}")
    return out


def _verdicts(data: dict[str, Any]) -> list[str]:
    rows = ["VERDICTS"]
    for v in data["verdicts"]:
        rows.append(f"  [{v['result'].upper():<4}] {v['id']}: {v['text']}")
        rows += [f"      - {item}" for item in v["items"]]
        rows += _sources(v["rests_on"])
    return rows


def _tables(data: dict[str, Any]) -> list[str]:
    head = f"  {'A':<20} {'B':<20} {'STATUS':<18} {'PATH':<9} {'RELAY':<12} HANDSHAKE"
    rows = ["", "PAIRS THE POLICY LETS TALK", head]
    for p in data["pairs"]:
        age = "-" if p["handshake_age"] is None else f"{p['handshake_age']:.0f} s"
        rows.append(f"  {p['a']['name']:<20} {p['b']['name']:<20} {p['status']:<18} "
                    f"{p['path'] or '-':<9} {p['relay'] or '-':<12} {age}")  # fmt: skip
    head = f"  {'NAME':<20} {'KEY AGE (d)':<12} {'ROTATIONS':<10} {'EXPIRES':<22} OWNER"
    rows += ["", "DEVICES AND KEYS", head]
    for d in data["devices"]:
        rows.append(f"  {d['name']:<20} {d['key_age_days']:<12} {d['rotations']:<10} "
                    f"{d['expires_at'] or 'never':<22} {d['owner']}")  # fmt: skip
    rows += ["", "EVENTS IN THE PERIOD"]
    for kind, events in data["events"].items():
        rows.append(f"  {kind}: {len(events)}")
        rows += [f"    {e['at']} {e['action']} {e['target']} by {e['actor']}" for e in events]
    return rows


def render_text(data: dict[str, Any]) -> str:
    """The report as text, from the API's JSON."""
    p = data["policy"]
    rows = [
        f"EVIDENCE REPORT {data['period']['since']} to {data['period']['until']}",
        f"generated {data['generated_at']}; policy sha256 {p['hash']} ({p['source']}, "
        f"map version {p['version']}); maximum key age {data['max_key_age_days']} days",
        "",
        *_verdicts(data),
        "",
        "STATEMENTS",
    ]
    for s in data["statements"]:
        rows.append(f"  {s['id']}: {s['text']}")
        rows += _sources(s["rests_on"])
    return "\n".join([*rows, *_tables(data)])


@click.command("report")
@click.option("--since", default=None, help="RFC 3339 or POSIX seconds (default: until - 30 d).")
@click.option("--until", default=None, help="RFC 3339 time or POSIX seconds (default: now).")
@click.option("--max-key-age", "max_key_age", type=click.IntRange(1, 3650), default=None,
              help="Days: older keys fail keys_over_max_age (default: 90).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The gateway's JSON.")
@click.pass_context
def report(
    ctx: click.Context, since: str | None, until: str | None, max_key_age: int | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Evidence that data in transit is encrypted: keys, coverage, policy, relays."""
    params = {"since": since, "until": until, "max_key_age_days": max_key_age}
    query = urlencode({k: v for k, v in params.items() if v is not None})
    client: AdminClient = ctx.obj  # set by the `wiregate admin` group
    try:
        data = asyncio.run(client.call("GET", "/api/v1/report" + (f"?{query}" if query else "")))
    except WiregateError as exc:
        exit_with(exc)
    click.echo(json.dumps(data, indent=2) if as_json else render_text(data))

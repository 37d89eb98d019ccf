"""The evidence report: ``GET /api/v1/report?since=&until=&max_key_age_days=`` (admin).

Gathers the facts (the store's devices, identities, the period's audit records, path
reports and policy in force; the broker's peering under that policy and the routes it
carries; the configured relays) and hands them to the pure :mod:`gateway.evidence`.
The admin console's ``/admin/report`` page renders the same JSON.
"""

from __future__ import annotations

from datetime import datetime
from itertools import combinations_with_replacement
from typing import Any

from aiohttp import web

from gateway.api.common import require_admin, rfc3339
from gateway.api.devices import online_test
from gateway.appkeys import BROKER, CLOCK, RELAYS, STORE
from gateway.evidence import (
    AuditFact,
    DeviceFact,
    Facts,
    IdentityFact,
    PathFact,
    PolicyFact,
    build,
    pair_key,
    report_json,
)
from gateway.livepolicy import ALLOW_ALL
from gateway.mapping.broker import Broker
from gateway.mapping.netmap import signature
from gateway.store import DeviceRecord
from wiregate.errors import BadInput
from wiregate.model import Device

__all__ = [
    "DEFAULT_KEY_AGE_DAYS",
    "DEFAULT_PERIOD",
    "MAX_AUDIT",
    "gather",
    "parse_period",
    "report_for",
    "routes",
]

routes = web.RouteTableDef()
DEFAULT_PERIOD = 30 * 86400.0  # without ``since``: the 30 days before ``until``
DEFAULT_KEY_AGE_DAYS = 90
MAX_AUDIT = 100_000  # audit records read for one report (more: the report says so)
_KNOWN = {"since", "until", "max_key_age_days"}


def _time(name: str, text: str) -> float:
    try:
        if text.replace(".", "", 1).isdigit():
            return float(text)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError("no time zone")
        return parsed.timestamp()
    except ValueError:
        raise BadInput(f"{name} must be an RFC 3339 time or POSIX seconds") from None


def parse_period(query: Any, now: float) -> tuple[float, float, float]:
    """(since, until, max key age in seconds) from the query; :class:`BadInput` in one line."""
    unknown = set(query) - _KNOWN
    if unknown:
        raise BadInput(f"unknown parameter {sorted(unknown)[0]!r}",
                       hint="parameters: since, until, max_key_age_days")  # fmt: skip
    until = _time("until", query["until"]) if query.get("until") else now
    since = _time("since", query["since"]) if query.get("since") else until - DEFAULT_PERIOD
    if since >= until:
        raise BadInput("since must be before until")
    days = query.get("max_key_age_days", str(DEFAULT_KEY_AGE_DAYS))
    if not (days.isascii() and days.isdigit()) or not 1 <= int(days) <= 3650:
        raise BadInput("max_key_age_days must be an integer from 1 to 3650")
    return since, until, int(days) * 86400.0


def _device(record: DeviceRecord, online: bool, broker: Broker) -> DeviceFact:
    d = record.device
    carried = tuple(r for r in d.routes if any(o.id == d.id for o in broker.route_owners(r)))
    return DeviceFact(d.id, d.name, f"{d.identity.issuer}#{d.identity.subject}", tuple(d.tags),
                      d.created_at, record.key_rotated_at, d.expires_at, record.last_seen,
                      online, tuple(d.routes), carried)  # fmt: skip


def _peering(broker: Broker, records: list[DeviceRecord]) -> frozenset[tuple[str, str]]:
    """The pairs of the store's devices that the policy in force lets peer: decided once
    per pair of principal sets (devices with the same tags and groups peer alike)."""
    groups: dict[frozenset[str], list[Device]] = {}
    for r in records:
        groups.setdefault(signature(r.device), []).append(r.device)
    found: set[tuple[str, str]] = set()
    for ga, gb in combinations_with_replacement(list(groups.values()), 2):
        if broker.may_peer(ga[0], gb[0]):
            found.update(pair_key(a.id, b.id) for a in ga for b in gb if a.id != b.id)
    return frozenset(found)


async def gather(app: web.Application, since: float, until: float, max_age: float) -> Facts:
    """The facts of the report for ``[since, until]``, as of now."""
    store, broker = app[STORE], app[BROKER]
    now = app[CLOCK]()
    online = online_test(app)
    records = await store.list_devices()
    audit = await store.audit_between(since, until, MAX_AUDIT + 1)
    stored = await store.policy()
    policy = (
        PolicyFact(ALLOW_ALL.hash, "default", 0, None, None)
        if stored is None
        else PolicyFact(stored.hash, stored.source.value, stored.version, stored.at, stored.actor)
    )
    return Facts(
        generated_at=now, since=since, until=until, max_key_age=max_age,
        devices=tuple(_device(r, online(r), broker) for r in records),
        identities=tuple(IdentityFact(i.id, f"{i.identity.issuer}#{i.identity.subject}",
                                      i.created_at, i.disabled, i.devices)
                         for i in await store.list_identities()),
        audit=tuple(AuditFact(r.at, r.actor, r.action, r.target, r.detail)
                    for r in audit[:MAX_AUDIT]),
        audit_truncated=len(audit) > MAX_AUDIT,
        peering=_peering(broker, records),
        paths=tuple(PathFact(p.reporter, p.entry.peer, p.entry.path, p.entry.relay,
                             p.entry.handshake_age, p.reported_at)
                    for p in await store.list_paths()),
        policy=policy,
        relays=tuple(r.id for r in app[RELAYS]),
    )  # fmt: skip


async def report_for(app: web.Application, query: Any) -> dict[str, Any]:
    """The report's JSON for a request's query (:class:`BadInput` for a bad one)."""
    since, until, max_age = parse_period(query, app[CLOCK]())
    return report_json(build(await gather(app, since, until, max_age)), rfc3339)


@routes.get("/api/v1/report")
async def get_report(request: web.Request) -> web.Response:
    """The evidence report of ``[since, until]`` (default: the last 30 days)."""
    require_admin(request)
    return web.json_response(await report_for(request.app, request.query))

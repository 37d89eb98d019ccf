"""The evidence report (pure: no store, no clock, no web framework).

For a period, what an auditor asks about data in transit (PCI DSS 4.0 req. 4.2.1,
SOC 2 CC6.7): every device's key age, rotations, expiry, approvals and revocations;
whether every pair the policy lets talk has a live WireGuard handshake; which routes
leave the tunnel (in clear beyond the device carrying them); host traffic; the policy
in force and its hash; the relays used. The caller gathers the :class:`Facts` (the
store, the broker, the path reports); :func:`build` turns them into a :class:`Report`
whose every statement and verdict names the data it rests on (:class:`Source`).

Honesty rules: a pair with no fresh report is ``unknown``, never ``encrypted``; a
report holds the last state of each pair, not its history over the period, and the
report says so; what wiregate does not do (host traffic) is said, not implied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from gateway.pathmatrix import STALE_AFTER

__all__ = [
    "APPROVALS",
    "HOST_TRAFFIC_UNAVAILABLE",
    "LIVE_HANDSHAKE",
    "REVOCATIONS",
    "AuditFact",
    "DeviceFact",
    "Facts",
    "IdentityFact",
    "PairLine",
    "PathFact",
    "PolicyFact",
    "Report",
    "Source",
    "Statement",
    "Verdict",
    "build",
    "pair_key",
    "report_json",
]

#: WireGuard's REJECT_AFTER_TIME: a session older than this carries no data.
LIVE_HANDSHAKE: Final = 180.0
ROTATIONS: Final = ("device.rotate",)
APPROVALS: Final = ("device.enroll", "login.approve")
REVOCATIONS: Final = ("device.delete", "device.expire", "device.replace", "identity.revoke",
                      "identity.disable", "key.revoke", "login.deny")  # fmt: skip
POLICY_CHANGES: Final = ("policy.set",)
HOST_TRAFFIC_UNAVAILABLE: Final = (
    "host traffic: not shown to be encrypted: each node chooses its mode (agent setting "
    "host_traffic: off by default, nonstrict or strict; docs/host-traffic.md) and does not "
    "report it to the gateway; without it only traffic to and from tunnel addresses and "
    "carried routes goes through WireGuard"
)
Result = Literal["pass", "fail", "info"]
PairStatus = Literal["encrypted", "no-live-handshake", "unknown"]


@dataclass(frozen=True, slots=True)
class Source:
    """Data a statement rests on: what it is (store table, endpoint), how many, as of when."""

    data: str
    count: int | None = None
    as_of: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceFact:
    """A device now (from the store and the broker)."""

    id: str
    name: str
    owner: str  # issuer#subject
    tags: tuple[str, ...]
    created_at: float
    key_rotated_at: float | None
    expires_at: float | None
    last_seen: float | None
    online: bool
    routes: tuple[str, ...] = ()  # advertised
    carried: tuple[str, ...] = ()  # those in peers' maps (policy approved, not taken)

    @property
    def key_since(self) -> float:
        """When its current key came into use: its last rotation, else its enrollment."""
        return self.key_rotated_at if self.key_rotated_at is not None else self.created_at


@dataclass(frozen=True, slots=True)
class IdentityFact:
    """An identity now."""

    id: int
    owner: str  # issuer#subject
    created_at: float
    disabled: bool
    devices: int


@dataclass(frozen=True, slots=True)
class AuditFact:
    """An audit record of the period."""

    at: float
    actor: str
    action: str
    target: str
    detail: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PathFact:
    """A reporter's last report of its path to a peer (``handshake_age`` as of ``reported_at``)."""

    reporter: str
    peer: str
    path: str
    relay: str | None
    handshake_age: float | None
    reported_at: float


@dataclass(frozen=True, slots=True)
class PolicyFact:
    """The policy in force: its hash (sha256 of the document), where from, since when."""

    hash: str
    source: str
    version: int
    set_at: float | None
    set_by: str | None


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the report is made of, gathered at ``generated_at``."""

    generated_at: float
    since: float
    until: float
    max_key_age: float
    devices: tuple[DeviceFact, ...]
    identities: tuple[IdentityFact, ...]
    audit: tuple[AuditFact, ...]  # the period's records
    audit_truncated: bool
    peering: frozenset[tuple[str, str]]  # pairs (lower id first) the policy lets peer
    paths: tuple[PathFact, ...]
    policy: PolicyFact
    relays: tuple[str, ...]  # configured relay ids
    host_traffic_mode: str | None = None  # None: the nodes' modes are not known here


@dataclass(frozen=True, slots=True)
class Statement:
    """One sentence of the report and the data it rests on."""

    id: str
    text: str
    rests_on: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check: ``pass``, ``fail`` or ``info``, the items that made it fail, its data."""

    id: str
    result: Result
    text: str
    items: tuple[str, ...]
    rests_on: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class PairLine:
    """A pair the policy lets talk, and what its reports say."""

    a: str
    b: str
    status: PairStatus
    path: str | None
    relay: str | None
    handshake_age: float | None  # as of the newest fresh report's time
    reported_at: float | None


@dataclass(frozen=True, slots=True)
class Report:
    """The evidence report: verdicts first, then statements, then the tables."""

    facts: Facts
    verdicts: tuple[Verdict, ...]
    statements: tuple[Statement, ...]
    pairs: tuple[PairLine, ...]
    events: Mapping[str, tuple[AuditFact, ...]]  # rotations, approvals, revocations, policy


def pair_key(a: str, b: str) -> tuple[str, str]:
    """A pair in the order :attr:`Facts.peering` holds it."""
    return (a, b) if a <= b else (b, a)


def _live(p: PathFact, now: float) -> bool:
    return (
        now - p.reported_at <= STALE_AFTER
        and p.handshake_age is not None
        and p.handshake_age <= LIVE_HANDSHAKE
    )


def _pair(a: str, b: str, reports: list[PathFact], now: float) -> PairLine:
    fresh = sorted((p for p in reports if now - p.reported_at <= STALE_AFTER),
                   key=lambda p: (_live(p, now), p.reported_at))  # fmt: skip
    if not fresh:
        return PairLine(a, b, "unknown", None, None, None, None)
    best = fresh[-1]
    status: PairStatus = "encrypted" if _live(best, now) else "no-live-handshake"
    return PairLine(a, b, status, best.path, best.relay, best.handshake_age, best.reported_at)


def pairs_of(facts: Facts) -> tuple[PairLine, ...]:
    """Every pair the policy lets talk, with its status (both directions' reports)."""
    ids = {d.id for d in facts.devices}
    reports: dict[tuple[str, str], list[PathFact]] = {}
    for p in facts.paths:
        reports.setdefault(pair_key(p.reporter, p.peer), []).append(p)
    return tuple(
        _pair(a, b, reports.get((a, b), []), facts.generated_at)
        for a, b in sorted(facts.peering)
        if a in ids and b in ids
    )


def _events(facts: Facts) -> dict[str, tuple[AuditFact, ...]]:
    kinds = {"rotations": ROTATIONS, "approvals": APPROVALS, "revocations": REVOCATIONS,
             "policy": POLICY_CHANGES}  # fmt: skip
    return {k: tuple(r for r in facts.audit if r.action in acts) for k, acts in kinds.items()}


def build(facts: Facts) -> Report:
    """The report of ``facts``."""
    pairs = pairs_of(facts)
    events = _events(facts)
    src = _Sources(facts)
    verdicts = (
        _coverage(facts, pairs, src),
        _key_age(facts, src),
        _expired(facts, src),
        _routes(facts, src),
        _host(facts),
        _disabled(facts, src),
        _audit_complete(facts, src),
        _revocations(events["revocations"], src),
    )
    return Report(facts, verdicts, _statements(facts, pairs, events, src), pairs, events)


class _Sources:
    """The data sources of one report, with their counts and times."""

    def __init__(self, facts: Facts) -> None:
        now = facts.generated_at
        self.devices = Source("devices (store), as GET /api/v1/devices", len(facts.devices), now)
        self.identities = Source(
            "identities (store), as GET /api/v1/identities", len(facts.identities), now
        )
        self.audit = Source(
            "audit log (store) between since and until, as GET /api/v1/audit",
            len(facts.audit),
            facts.until,
        )
        self.peering = Source("policy in force, evaluated by the broker for each pair of devices",
                              len(facts.peering), now)  # fmt: skip
        self.paths = Source("path_reports (store), as GET /api/v1/paths", len(facts.paths), now)
        self.policy = Source("policies (store), as GET /api/v1/policy", 1, now)
        self.relays = Source("configured relays (gateway settings), as GET /api/v1/relays",
                             len(facts.relays), now)  # fmt: skip
        self.host = Source("agent settings: host_traffic (not reported to the gateway)")
        online = sum(1 for d in facts.devices if d.online)
        self.online = Source("map streams held (broker), else last_seen, as GET "
                             "/api/v1/devices 'online'", online, now)  # fmt: skip

    def events(self, name: str, count: int, until: float) -> Source:
        return Source(f"audit log (store): {name} between since and until", count, until)


def _coverage(facts: Facts, pairs: tuple[PairLine, ...], src: _Sources) -> Verdict:
    names = _names(facts)
    bad = tuple(f"{names[p.a]} ↔ {names[p.b]}: {p.status}" for p in pairs
                if p.status != "encrypted")  # fmt: skip
    text = (
        f"{len(pairs) - len(bad)} of {len(pairs)} pairs the policy lets talk have a live "
        f"handshake (≤ {LIVE_HANDSHAKE:.0f} s) in a report fresher than {STALE_AFTER:.0f} s"
    )
    return Verdict("pairs_without_live_handshake", "fail" if bad else "pass", text, bad,
                   (src.peering, src.paths, src.devices))  # fmt: skip


def _key_age(facts: Facts, src: _Sources) -> Verdict:
    now, limit = facts.generated_at, facts.max_key_age
    old = tuple(f"{d.name}: key {_days(now - d.key_since)} old"
                for d in facts.devices if now - d.key_since > limit)  # fmt: skip
    text = f"{len(old)} devices hold a key older than the maximum age ({_days(limit)})"
    return Verdict("keys_over_max_age", "fail" if old else "pass", text, old, (src.devices,))


def _expired(facts: Facts, src: _Sources) -> Verdict:
    now = facts.generated_at
    late = tuple(d.name for d in facts.devices if d.expires_at is not None and d.expires_at < now)
    text = f"{len(late)} devices are still present with an expired key"
    return Verdict("expired_keys_present", "fail" if late else "pass", text, late, (src.devices,))


def _routes(facts: Facts, src: _Sources) -> Verdict:
    items = tuple(f"{r} leaves the tunnel at {d.name}" for d in facts.devices for r in d.carried)
    text = (f"{len(items)} carried routes leave the tunnel at the device carrying them "
            "(in clear beyond it, as wiregate does not encrypt past its devices)")  # fmt: skip
    return Verdict("routes_leaving_in_clear", "fail" if items else "pass", text, items,
                   (src.devices, src.peering))  # fmt: skip


def _host(facts: Facts) -> Verdict:
    if facts.host_traffic_mode is None:
        return Verdict("host_traffic", "fail", HOST_TRAFFIC_UNAVAILABLE, (),
                       (_Sources(facts).host,))  # fmt: skip
    text = f"host traffic mode: {facts.host_traffic_mode}"
    return Verdict("host_traffic", "info", text, (), (Source("gateway settings"),))


def _disabled(facts: Facts, src: _Sources) -> Verdict:
    held = tuple(f"{i.owner}: {i.devices} devices" for i in facts.identities
                 if i.disabled and i.devices)  # fmt: skip
    text = f"{len(held)} disabled identities still hold devices"
    return Verdict("disabled_identities_with_devices", "fail" if held else "pass", text, held,
                   (src.identities,))  # fmt: skip


def _audit_complete(facts: Facts, src: _Sources) -> Verdict:
    if facts.audit_truncated:
        text = f"the period holds more audit records than were read ({len(facts.audit)})"
        return Verdict("audit_complete", "fail", text, (), (src.audit,))
    text = f"every audit record of the period was read ({len(facts.audit)})"
    return Verdict("audit_complete", "pass", text, (), (src.audit,))


def _revocations(revoked: tuple[AuditFact, ...], src: _Sources) -> Verdict:
    by = Counter(r.action for r in revoked)
    text = f"{len(revoked)} revocations in the period" + (
        ": " + ", ".join(f"{n} {a}" for a, n in sorted(by.items())) if by else ""
    )
    items = tuple(f"{r.action} {r.target} by {r.actor}" for r in revoked)
    return Verdict("revocations_in_period", "info", text, items,
                   (src.events("revocations", len(revoked), src.audit.as_of or 0.0),))  # fmt: skip


def _statements(
    facts: Facts, pairs: tuple[PairLine, ...], events: Mapping[str, tuple[AuditFact, ...]],
    src: _Sources,
) -> tuple[Statement, ...]:  # fmt: skip
    by = Counter(p.status for p in pairs)
    online = sum(1 for d in facts.devices if d.online)
    relayed = sorted({p.relay for p in facts.paths if p.relay is not None and p.path == "relayed"})
    p = facts.policy
    until = facts.until
    return (
        Statement("devices", f"{len(facts.devices)} devices are enrolled, {online} online now; "
                  "the store holds each one's WireGuard public key only",
                  (src.devices, src.online)),
        Statement("identities", f"{len(facts.identities)} identities; "
                  f"{sum(1 for i in facts.identities if i.disabled)} disabled", (src.identities,)),
        Statement("rotations", f"{len(events['rotations'])} key rotations in the period",
                  (src.events("device.rotate", len(events["rotations"]), until),)),
        Statement("approvals", f"{len(events['approvals'])} enrollments and login approvals "
                  "in the period",
                  (src.events("device.enroll, login.approve", len(events["approvals"]), until),)),
        Statement("revocations", f"{len(events['revocations'])} revocations, expiries and "
                  "removals in the period",
                  (src.events(", ".join(REVOCATIONS), len(events["revocations"]), until),)),
        Statement("coverage", f"{len(pairs)} pairs may talk under the policy: "
                  f"{by['encrypted']} encrypted (live handshake), {by['no-live-handshake']} "
                  f"without a live handshake, {by['unknown']} unknown (no fresh report); a "
                  "report holds each pair's last state, not its history over the period",
                  (src.peering, src.paths)),
        Statement("host_traffic", HOST_TRAFFIC_UNAVAILABLE if facts.host_traffic_mode is None
                  else f"host traffic mode: {facts.host_traffic_mode}", (src.host,)),
        Statement("policy", f"policy in force: sha256 {p.hash}, source {p.source}, map "
                  f"version {p.version}; {len(events['policy'])} policy changes in the period",
                  (src.policy, src.events("policy.set", len(events["policy"]), until))),
        Statement("relays", f"{len(facts.relays)} relays configured; relays in the last "
                  f"reports: {', '.join(relayed) if relayed else 'none'}; a relay forwards "
                  "WireGuard datagrams it cannot decrypt", (src.relays, src.paths)),
    )  # fmt: skip


def _names(facts: Facts) -> dict[str, str]:
    return {d.id: d.name for d in facts.devices}


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d"


# -- JSON -----------------------------------------------------------------------------

Stamp = Callable[[float | None], str | None]


def _source_json(s: Source, stamp: Stamp) -> dict[str, Any]:
    return {"data": s.data, "count": s.count, "as_of": stamp(s.as_of)}


def _sources(items: Iterable[Source], stamp: Stamp) -> list[dict[str, Any]]:
    return [_source_json(s, stamp) for s in items]


def _device_json(d: DeviceFact, facts: Facts, stamp: Stamp) -> dict[str, Any]:
    mine = [r for r in facts.audit if r.target == d.id]
    return {
        "id": d.id, "name": d.name, "owner": d.owner, "tags": list(d.tags),
        "online": d.online, "last_seen": stamp(d.last_seen), "created_at": stamp(d.created_at),
        "key_since": stamp(d.key_since),
        "key_age_days": round((facts.generated_at - d.key_since) / 86400, 2),
        "expires_at": stamp(d.expires_at),
        "rotations": sum(1 for r in mine if r.action in ROTATIONS),
        "approvals": sum(1 for r in mine if r.action in APPROVALS),
        "routes": list(d.routes), "carried_routes": list(d.carried),
    }  # fmt: skip


def _event_json(r: AuditFact, stamp: Stamp) -> dict[str, Any]:
    return {"at": stamp(r.at), "actor": r.actor, "action": r.action, "target": r.target,
            "detail": dict(r.detail)}  # fmt: skip


def report_json(report: Report, stamp: Stamp) -> dict[str, Any]:
    """The report as ``GET /api/v1/report`` serves it (``stamp``: POSIX seconds → RFC 3339)."""
    f = report.facts
    names = _names(f)
    return {
        "period": {"since": stamp(f.since), "until": stamp(f.until)},
        "generated_at": stamp(f.generated_at),
        "max_key_age_days": round(f.max_key_age / 86400, 2),
        "verdicts": [
            {"id": v.id, "result": v.result, "text": v.text, "items": list(v.items),
             "rests_on": _sources(v.rests_on, stamp)} for v in report.verdicts
        ],
        "statements": [
            {"id": s.id, "text": s.text, "rests_on": _sources(s.rests_on, stamp)}
            for s in report.statements
        ],
        "devices": [_device_json(d, f, stamp) for d in f.devices],
        "identities": [
            {"id": i.id, "owner": i.owner, "created_at": stamp(i.created_at),
             "disabled": i.disabled, "devices": i.devices} for i in f.identities
        ],
        "pairs": [
            {"a": {"id": p.a, "name": names[p.a]}, "b": {"id": p.b, "name": names[p.b]},
             "status": p.status, "path": p.path, "relay": p.relay,
             "handshake_age": p.handshake_age, "reported_at": stamp(p.reported_at)}
            for p in report.pairs
        ],
        "events": {k: [_event_json(r, stamp) for r in v] for k, v in report.events.items()},
        "policy": {"hash": f.policy.hash, "source": f.policy.source,
                   "version": f.policy.version, "set_at": stamp(f.policy.set_at),
                   "set_by": f.policy.set_by},
        "relays": {"configured": list(f.relays), "in_reports": sorted(
            {p.relay for p in f.paths if p.relay is not None and p.path == "relayed"})},
        "host_traffic": {"mode": f.host_traffic_mode, "available": f.host_traffic_mode is not None},
    }  # fmt: skip

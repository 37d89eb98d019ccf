"""The evidence report's pure core: fixtures of facts → statements and verdicts. Each
verdict is shown passing and failing; a pair with no fresh report is "unknown", never
"encrypted"; every statement and verdict names the data it rests on."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.api.common import rfc3339
from gateway.evidence import (
    HOST_TRAFFIC_UNAVAILABLE,
    LIVE_HANDSHAKE,
    AuditFact,
    DeviceFact,
    Facts,
    IdentityFact,
    PathFact,
    PolicyFact,
    Report,
    build,
    pair_key,
    report_json,
)
from gateway.pathmatrix import STALE_AFTER

NOW = 1_800_000_000.0
DAY = 86400.0


def device(id_: str, **kw: Any) -> DeviceFact:
    base: dict[str, Any] = {"id": id_, "name": id_.removeprefix("dev_"), "owner": "iss#sub",
                            "tags": (), "created_at": NOW - 10 * DAY, "key_rotated_at": None,
                            "expires_at": None, "last_seen": NOW, "online": True}  # fmt: skip
    return DeviceFact(**{**base, **kw})


def live(reporter: str, peer: str, **kw: Any) -> PathFact:
    base: dict[str, Any] = {"reporter": reporter, "peer": peer, "path": "direct", "relay": None,
                            "handshake_age": 30.0, "reported_at": NOW - 60}  # fmt: skip
    return PathFact(**{**base, **kw})


def facts(**kw: Any) -> Facts:
    a, b, c = device("dev_a"), device("dev_b"), device("dev_c")
    base: dict[str, Any] = {
        "generated_at": NOW, "since": NOW - 30 * DAY, "until": NOW, "max_key_age": 90 * DAY,
        "devices": (a, b, c), "identities": (IdentityFact(1, "iss#sub", NOW - 20 * DAY, False, 3),),
        "audit": (), "audit_truncated": False,
        "peering": frozenset({pair_key("dev_a", "dev_b"), pair_key("dev_b", "dev_c")}),
        "paths": (live("dev_a", "dev_b"), live("dev_c", "dev_b")),
        "policy": PolicyFact("ab" * 32, "api", 7, NOW - DAY, "admin:socket"),
        "relays": ("relay-1",), "host_traffic_mode": None,
    }  # fmt: skip
    return Facts(**{**base, **kw})


def verdict(report: Report, vid: str) -> tuple[str, tuple[str, ...]]:
    [found] = [v for v in report.verdicts if v.id == vid]
    assert found.rests_on, f"{vid} names no data"
    return found.result, found.items


def test_every_pair_live_passes_coverage() -> None:
    report = build(facts())
    assert [p.status for p in report.pairs] == ["encrypted", "encrypted"]
    assert verdict(report, "pairs_without_live_handshake") == ("pass", ())


def test_a_pair_with_no_report_is_unknown_not_encrypted() -> None:
    report = build(facts(paths=(live("dev_a", "dev_b"),)))
    by = {(p.a, p.b): p.status for p in report.pairs}
    assert by[("dev_b", "dev_c")] == "unknown"
    result, items = verdict(report, "pairs_without_live_handshake")
    assert result == "fail" and items == ("b ↔ c: unknown",)


def test_a_stale_report_is_unknown_and_an_old_handshake_is_not_live() -> None:
    stale = live("dev_c", "dev_b", reported_at=NOW - STALE_AFTER - 1)
    old = live("dev_a", "dev_b", handshake_age=LIVE_HANDSHAKE + 1)
    report = build(facts(paths=(old, stale)))
    assert [p.status for p in report.pairs] == ["no-live-handshake", "unknown"]
    assert verdict(report, "pairs_without_live_handshake")[0] == "fail"
    never = live("dev_a", "dev_b", handshake_age=None)
    assert build(facts(paths=(never,))).pairs[0].status == "no-live-handshake"


def test_either_direction_proves_a_pair_and_the_live_one_wins() -> None:
    idle = live("dev_b", "dev_a", handshake_age=None, reported_at=NOW - 10)
    relayed = live("dev_a", "dev_b", path="relayed", relay="relay-2", reported_at=NOW - 100)
    [ab, _] = build(facts(paths=(idle, relayed, live("dev_b", "dev_c")))).pairs
    assert (ab.status, ab.path, ab.relay) == ("encrypted", "relayed", "relay-2")


def test_pairs_the_policy_does_not_allow_are_not_listed() -> None:
    report = build(facts(peering=frozenset({("dev_a", "dev_b"), ("dev_a", "dev_gone")})))
    assert [(p.a, p.b) for p in report.pairs] == [("dev_a", "dev_b")]


def test_key_age_verdict() -> None:
    assert verdict(build(facts()), "keys_over_max_age") == ("pass", ())
    old = device("dev_old", created_at=NOW - 100 * DAY)
    rotated = device("dev_new", created_at=NOW - 100 * DAY, key_rotated_at=NOW - DAY)
    report = build(facts(devices=(old, rotated)))
    assert verdict(report, "keys_over_max_age") == ("fail", ("old: key 100.0 d old",))


def test_expired_keys_still_present() -> None:
    fine = device("dev_a", expires_at=NOW + DAY)
    assert verdict(build(facts(devices=(fine,))), "expired_keys_present") == ("pass", ())
    late = device("dev_late", expires_at=NOW - 1)
    assert verdict(build(facts(devices=(late,))), "expired_keys_present") == ("fail", ("late",))


def test_carried_routes_leave_the_tunnel_in_clear() -> None:
    refused = device("dev_a", routes=("10.0.0.0/24",))  # advertised, not carried
    assert verdict(build(facts(devices=(refused,))), "routes_leaving_in_clear") == ("pass", ())
    router = device("dev_r", routes=("10.0.0.0/24",), carried=("10.0.0.0/24",))
    result, items = verdict(build(facts(devices=(router,))), "routes_leaving_in_clear")
    assert result == "fail" and items == ("10.0.0.0/24 leaves the tunnel at r",)


def test_host_traffic_is_not_shown_encrypted_while_the_nodes_do_not_report_their_mode() -> None:
    report = build(facts())
    [host] = [v for v in report.verdicts if v.id == "host_traffic"]
    assert host.result == "fail" and host.text == HOST_TRAFFIC_UNAVAILABLE
    assert "not reported to the gateway" in host.rests_on[0].data
    [said] = [s for s in report.statements if s.id == "host_traffic"]
    assert said.text.startswith("host traffic: not shown to be encrypted")


def test_disabled_identities_holding_devices() -> None:
    held = IdentityFact(2, "iss#mallory", NOW, True, 1)
    empty = IdentityFact(3, "iss#eve", NOW, True, 0)
    assert (
        verdict(build(facts(identities=(empty,))), "disabled_identities_with_devices")[0] == "pass"
    )
    result, items = verdict(
        build(facts(identities=(held, empty))), "disabled_identities_with_devices"
    )
    assert result == "fail" and items == ("iss#mallory: 1 devices",)


def test_a_truncated_audit_read_fails() -> None:
    assert verdict(build(facts()), "audit_complete")[0] == "pass"
    assert verdict(build(facts(audit_truncated=True)), "audit_complete")[0] == "fail"


AUDIT = (
    AuditFact(NOW - 5 * DAY, "device:dev_a", "device.rotate", "dev_a", {"previous": "k1"}),
    AuditFact(NOW - 4 * DAY, "device:dev_a", "device.rotate", "dev_a"),
    AuditFact(NOW - 3 * DAY, "oidc:iss#sub", "login.approve", "req_1"),
    AuditFact(NOW - 3 * DAY, "device:dev_b", "device.enroll", "dev_b", {"login_request": "req_1"}),
    AuditFact(NOW - 2 * DAY, "admin:socket", "identity.revoke", "7"),
    AuditFact(
        NOW - 2 * DAY, "admin:socket", "device.delete", "dev_x", {"reason": "identity revoked"}
    ),
    AuditFact(NOW - DAY, "admin:socket", "policy.set", "policy", {"new_hash": "ab" * 32}),
    AuditFact(NOW - DAY, "admin:socket", "key.create", "key_1"),
)


def test_events_of_the_period_are_sorted_into_rotations_approvals_revocations() -> None:
    report = build(facts(audit=AUDIT))
    assert {k: len(v) for k, v in report.events.items()} == {
        "rotations": 2, "approvals": 2, "revocations": 2, "policy": 1}  # fmt: skip
    result, items = verdict(report, "revocations_in_period")
    assert result == "info" and items == (
        "identity.revoke 7 by admin:socket", "device.delete dev_x by admin:socket")  # fmt: skip
    body = report_json(report, rfc3339)
    a = next(d for d in body["devices"] if d["id"] == "dev_a")
    b = next(d for d in body["devices"] if d["id"] == "dev_b")
    assert (a["rotations"], a["approvals"], b["approvals"]) == (2, 0, 1)
    assert verdict(build(facts()), "revocations_in_period") == ("info", ())


def test_every_statement_names_its_data_with_counts() -> None:
    report = build(facts(audit=AUDIT))
    ids = [s.id for s in report.statements]
    assert ids == ["devices", "identities", "rotations", "approvals", "revocations", "coverage",
                   "host_traffic", "policy", "relays"]  # fmt: skip
    for s in report.statements:
        assert s.rests_on and all(src.data for src in s.rests_on), s.id
    said = {s.id: s for s in report.statements}
    assert said["rotations"].rests_on[0].count == 2
    assert (
        "sha256 " + "ab" * 32 in said["policy"].text and "1 policy changes" in said["policy"].text
    )
    assert said["coverage"].text.startswith("2 pairs may talk under the policy: 2 encrypted")
    assert "not its history" in said["coverage"].text
    assert said["devices"].rests_on[0].count == 3


def test_relays_used_come_from_relayed_reports() -> None:
    relayed = live("dev_a", "dev_b", path="relayed", relay="relay-2")
    body = report_json(build(facts(paths=(relayed,))), rfc3339)
    assert body["relays"] == {"configured": ["relay-1"], "in_reports": ["relay-2"]}
    said = {s["id"]: s["text"] for s in body["statements"]}
    assert "relays in the last reports: relay-2" in said["relays"]


def test_the_json_form() -> None:
    body = report_json(build(dataclasses.replace(facts(), audit=AUDIT)), rfc3339)
    assert body["period"] == {"since": rfc3339(NOW - 30 * DAY), "until": rfc3339(NOW)}
    assert body["policy"]["hash"] == "ab" * 32 and body["policy"]["version"] == 7
    assert body["host_traffic"] == {"mode": None, "available": False}
    assert body["pairs"][0]["a"] == {"id": "dev_a", "name": "a"}
    assert body["verdicts"][0]["rests_on"][0]["as_of"] == rfc3339(NOW)
    assert body["devices"][0]["key_age_days"] == 10.0

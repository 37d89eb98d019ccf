"""The evidence report of a lab run, every figure checked against independent sources.

A gateway under a policy that lets ``tag:lab`` devices peer with each other only;
four agents with ``tag:lab`` (``a`` to ``d``) and one with ``tag:island`` (``e``, which
peers with nobody). ``a`` rotates its key twice and ``b`` once (``wiregate rotate``),
``d`` is removed (``wiregate admin devices remove``), and ``a``, ``b``, ``c`` ping
each other so that every pair has a live handshake and reports it. Then ``wiregate
admin report --json`` (and ``wiregate report --json``, the same) is checked against:

- the gateway's SQLite database, opened read-only (``devices``, ``audit_log``,
  ``path_reports``): the devices listed, each key's age and rotation count, the
  revocation, the events of the period;
- ``wiregate admin audit --json``: the rotations and the revocation again;
- each agent's ``wiregate status --json``: the pairs are exactly the peers the agents
  hold, and a pair reported ``encrypted`` has a handshake the agents saw;
- ``GET /api/v1/policy``: the policy's hash and source;
- the verdicts and statements: consistent with those facts.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import time
from contextlib import closing
from datetime import datetime
from typing import Any

import pytest

from lab.harness import Agent, Lab, Wiregate, poll
from lab.mesh import wg_peers
from lab.ping import ping_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

POLICY = 'acls:\n  - {src: ["tag:lab"], dst: ["tag:lab"]}\n'
LAB, TALKERS, REMOVED, ISLAND = ("a", "b", "c", "d"), ("a", "b", "c"), "d", "e"
ROTATIONS = {"a": 2, "b": 1, "c": 0}
ROTATION_ORDER = ("a", "b", "a")
ROTATION_GAP = 6.0  # seconds: the gateway's MIN_ROTATION_INTERVAL is 5
LIVE = 180.0  # WireGuard's REJECT_AFTER_TIME, the report's live handshake
REVOCATIONS = ("device.delete", "device.expire", "device.replace", "identity.revoke",
               "identity.disable", "key.revoke", "login.deny")  # fmt: skip


def posix(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def query(gateway: Wiregate, sql: str, *args: Any) -> list[sqlite3.Row]:
    """Rows of the gateway's own database, opened read-only (the gateway keeps running)."""
    uri = f"file:{gateway.dir / 'wiregate.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        return list(db.execute(sql, args))


def api(gateway: Wiregate, path: str) -> Any:
    """``GET path`` over the admin unix socket (curl: not the wiregate client)."""
    out = gateway.lab.internet.run(
        ["curl", "-sS", "-f", "-m", "5", "--unix-socket", str(gateway.admin_socket),
         f"http://gateway{path}"], timeout=10,
    ).stdout  # fmt: skip
    return json.loads(out)


def rotate(gateway: Wiregate, agent: Agent) -> str:
    """``wiregate rotate`` on the agent's host; the new public key, once in use."""
    before = gateway.status(agent)["device"]["public_key"]
    agent.host.run([*gateway.cmd, "rotate", "--run-dir", str(agent.run_dir)], timeout=60)
    after = str(gateway.status(agent)["device"]["public_key"])
    assert after != before
    return after


def live_reports(gateway: Wiregate, ids: dict[str, str], keys_since: dict[str, float]) -> bool:
    """Both ends of every talking pair reported a handshake made with their current keys
    (after the later of the two devices' last rotation)."""
    rows = query(gateway, "SELECT reporter_id, peer_id, handshake_age, reported_at "
                 "FROM path_reports")  # fmt: skip
    seen = {(r["reporter_id"], r["peer_id"]): r["reported_at"] - r["handshake_age"]
            for r in rows if r["handshake_age"] is not None}  # fmt: skip
    return all(
        seen.get((ids[x], ids[y]), 0.0) >= max(keys_since[x], keys_since[y]) - 1.0
        for x, y in itertools.permutations(TALKERS, 2)
    )


def start(lab: Lab, gateway: Wiregate) -> dict[str, Agent]:
    policy = lab.workdir / "policy.yaml"
    policy.write_text(POLICY)
    gateway.admin("policy", "set", str(policy))
    keys = {
        "lab": gateway.create_key(tags="tag:lab"),
        "island": gateway.create_key(tags="tag:island"),
    }
    agents = {
        name: gateway.start_agent(lab.add_host(name), keys["island" if name == ISLAND else "lab"])
        for name in (*LAB, ISLAND)
    }
    gateway.wait_mesh([agents[n] for n in LAB], timeout=120)
    poll(lambda: gateway.status(agents[ISLAND])["gateway"]["connected"], timeout=60,
         what="the island agent to connect")  # fmt: skip
    return agents


def run(gateway: Wiregate, agents: dict[str, Agent]) -> dict[str, str]:
    """Rotations, the revocation and the traffic; the device ids by host name."""
    ids = {n: gateway.status(a)["device"]["id"] for n, a in agents.items()}
    last: dict[str, float] = {}
    keys_since = dict.fromkeys(TALKERS, 0.0)  # POSIX time each one's current key was in use
    for name in ROTATION_ORDER:  # the gateway refuses a second rotation within 5 s
        time.sleep(max(0.0, last.get(name, 0.0) + ROTATION_GAP - time.monotonic()))
        rotate(gateway, agents[name])
        last[name], keys_since[name] = time.monotonic(), time.time()
    removed_key = gateway.status(agents[REMOVED])["device"]["public_key"]
    gateway.admin("devices", "remove", ids[REMOVED])
    poll(lambda: all(removed_key not in wg_peers(agents[n]) for n in TALKERS), timeout=10,
         what="the removed device to leave its peers")  # fmt: skip
    gateway.wait_mesh([agents[n] for n in TALKERS], timeout=60)
    addrs = {n: gateway.tunnel_addresses(agents[n])[0] for n in TALKERS}
    for src, dst in itertools.permutations(TALKERS, 2):
        assert ping_until(agents[src].host, addrs[dst], 20), f"{src} -> {dst}"
    poll(lambda: live_reports(gateway, ids, keys_since), timeout=200, interval=3.0,
         what="every talking pair's handshake in the path reports")  # fmt: skip
    return ids


def check_devices(gateway: Wiregate, report: dict[str, Any], ids: dict[str, str]) -> None:
    """Key age and rotations against the database and the audit log."""
    now = posix(report["generated_at"])
    rows = {r["id"]: r for r in query(gateway, "SELECT * FROM devices")}
    listed = {d["id"]: d for d in report["devices"]}
    assert set(listed) == set(rows) == {ids[n] for n in (*TALKERS, ISLAND)}
    audit = gateway.admin_json("audit", "--limit", "1000")["events"]
    for name in (*TALKERS, ISLAND):
        d, row = listed[ids[name]], rows[ids[name]]
        since = row["key_rotated_at"] if row["key_rotated_at"] is not None else row["created_at"]
        assert posix(d["key_since"]) == pytest.approx(since, abs=1e-5), name
        assert d["key_age_days"] == round((now - since) / 86400, 2)
        stored = query(gateway, "SELECT COUNT(*) FROM audit_log WHERE action = 'device.rotate' "
                       "AND target = ?", ids[name])[0][0]  # fmt: skip
        logged = sum(e["action"] == "device.rotate" and e["target"] == ids[name] for e in audit)
        assert d["rotations"] == stored == logged == ROTATIONS.get(name, 0), name
        assert (row["key_rotated_at"] is not None) == (ROTATIONS.get(name, 0) > 0)
        assert d["name"] == row["name"] == name and d["online"]


def check_events(gateway: Wiregate, report: dict[str, Any], ids: dict[str, str]) -> None:
    """The revoked device and the period's events against the database."""
    since, until = (posix(report["period"][k]) for k in ("since", "until"))
    rows = query(gateway, "SELECT action, target, actor FROM audit_log WHERE at >= ? AND at <= ?",
                 since, until)  # fmt: skip
    revoked = [(r["action"], r["target"]) for r in rows if r["action"] in REVOCATIONS]
    assert revoked == [("device.delete", ids[REMOVED])]
    events = report["events"]
    assert [(e["action"], e["target"], e["actor"]) for e in events["revocations"]] == [
        ("device.delete", ids[REMOVED], "admin:socket")
    ]
    assert not query(gateway, "SELECT id FROM devices WHERE id = ?", ids[REMOVED])
    assert len(events["rotations"]) == sum(r["action"] == "device.rotate" for r in rows) == 3
    assert len(events["approvals"]) == sum(r["action"] == "device.enroll" for r in rows) == 5
    assert [e["action"] for e in events["policy"]] == ["policy.set"]
    verdicts = {v["id"]: v for v in report["verdicts"]}
    assert verdicts["revocations_in_period"]["items"] == [
        f"device.delete {ids[REMOVED]} by admin:socket"
    ]
    statements = {s["id"]: s["text"] for s in report["statements"]}
    assert statements["rotations"].startswith("3 key rotations")
    assert statements["revocations"].startswith("1 revocations")
    assert verdicts["audit_complete"]["result"] == "pass"
    assert str(len(rows)) in verdicts["audit_complete"]["text"]


def check_pairs(
    gateway: Wiregate, report: dict[str, Any], ids: dict[str, str], agents: dict[str, Agent]
) -> None:  # fmt: skip
    """Each pair against the agents' own status and the path reports in the database."""
    docs = gateway.statuses([agents[n] for n in (*TALKERS, ISLAND)])
    names = {ids[n]: n for n in ids}
    held = {frozenset((n, names[p["id"]])) for n, doc in docs.items() for p in doc["peers"]}
    listed = {frozenset((p["a"]["name"], p["b"]["name"])): p for p in report["pairs"]}
    assert set(listed) == held == {frozenset(p) for p in itertools.combinations(TALKERS, 2)}
    stored = query(gateway, "SELECT * FROM path_reports")
    for pair, line in listed.items():
        assert line["status"] == "encrypted" and line["path"] == "direct", line
        assert line["handshake_age"] is not None and line["handshake_age"] <= LIVE
        at = posix(line["reported_at"])
        rows = [
            r
            for r in stored
            if {r["reporter_id"], r["peer_id"]} == {line["a"]["id"], line["b"]["id"]}
        ]
        same = [r for r in rows if r["reported_at"] == pytest.approx(at, abs=1e-5)]
        # the row the report read, unless a newer report replaced it since
        assert [r["handshake_age"] for r in same] == [line["handshake_age"]] or max(
            r["reported_at"] for r in rows) > at, (line, [dict(r) for r in rows])  # fmt: skip
        handshake = at - line["handshake_age"]  # as the reporter saw it
        for x, y in itertools.permutations(sorted(pair)):
            [peer] = [p for p in docs[x]["peers"] if p["id"] == ids[y]]
            seen = peer["last_handshake"]  # handshakes only move forward
            assert seen is not None and seen >= handshake - 2.0, (x, y, seen, handshake)
            assert posix(report["generated_at"]) - seen <= LIVE, (x, y)
    assert not docs[ISLAND]["peers"]


def check_policy_and_verdicts(gateway: Wiregate, report: dict[str, Any]) -> None:
    policy = api(gateway, "/api/v1/policy")["policy"]
    assert report["policy"]["hash"] == policy["hash"] and report["policy"]["source"] == "api"
    assert report["policy"]["set_by"] == "admin:socket"
    verdicts = {v["id"]: v["result"] for v in report["verdicts"]}
    assert verdicts == {
        "pairs_without_live_handshake": "pass",  # 3 of 3 encrypted (check_pairs)
        "keys_over_max_age": "pass",  # minutes old (check_devices)
        "expired_keys_present": "pass",  # the keys have no expiry
        "routes_leaving_in_clear": "pass",  # no device advertises a route
        "host_traffic": "fail",  # not reported by the agents: never claimed
        "disabled_identities_with_devices": "pass",
        "audit_complete": "pass",
        "revocations_in_period": "info",
    }
    statements = {s["id"]: s["text"] for s in report["statements"]}
    assert statements["coverage"].startswith(
        "3 pairs may talk under the policy: 3 encrypted (live handshake), 0 without a live "
        "handshake, 0 unknown"
    )
    assert statements["devices"].startswith("4 devices are enrolled, 4 online now")
    assert f"sha256 {policy['hash']}" in statements["policy"]


def test_the_report_of_a_lab_run_checks_out(lab: Lab, gateway: Wiregate) -> None:
    agents = start(lab, gateway)
    ids = run(gateway, agents)
    report = gateway.admin_json("report")
    check_devices(gateway, report, ids)
    check_events(gateway, report, ids)
    check_pairs(gateway, report, ids, agents)
    check_policy_and_verdicts(gateway, report)
    top = subprocess.run([*gateway.cmd, "report", "--socket", str(gateway.admin_socket), "--json"],
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    again = json.loads(top.stdout)  # `wiregate report`: the same report
    assert [(v["id"], v["result"]) for v in again["verdicts"]] == [
        (v["id"], v["result"]) for v in report["verdicts"]
    ]
    assert again["events"] == report["events"] and again["policy"] == report["policy"]
    print("\nevidence report of the lab run:")
    for v in report["verdicts"]:
        print(f"  [{v['result']}] {v['id']}: {v['text']}")
    for d in report["devices"]:
        print(f"  device {d['name']}: key {d['key_age_days']} d, {d['rotations']} rotations")
    for line in report["pairs"]:
        print(f"  {line['a']['name']}-{line['b']['name']}: {line['status']} "
              f"(handshake {line['handshake_age']:.0f} s before its report)")  # fmt: skip

"""The agent's path report: each entry within what the gateway accepts, and sent on
change (at most every min_interval), in full every refresh and on a new stream."""

from __future__ import annotations

import dataclasses
import json

from agent.pathreport import POLICY_VIOLATION, PathReporter, entry_for
from agent.pmtu.search import PmtuCounters, PmtuResult
from wiregate.pathwire import MAX_PATH_ENTRIES, read_paths

T0 = 1_800_000_000.0
PATH = {"path": "relayed", "relay": "relay-1", "reason": "no direct path\nafter 3 probes"}
RESULT = PmtuResult(1340, "192.0.2.1:51820", T0, True, True, 9)


def test_an_entry_from_what_the_agent_knows() -> None:
    counts = PmtuCounters(searches=2, probes=20, probes_lost=4, frag_needed=1, black_holes=1)
    entry = entry_for("dev_b", PATH, RESULT, counts, T0 - 30, 1.23456, T0)
    assert (entry.path, entry.relay, entry.path_mtu, entry.black_hole) == (
        "relayed", "relay-1", 1340, True)  # fmt: skip
    assert (entry.frag_needed, entry.probe_failures, entry.handshake_age) == (1, 4, 30.0)
    assert entry.reason == "no direct pathafter 3 probes" and entry.rtt_ms == 1.23456


def test_an_entry_is_always_acceptable() -> None:
    odd = {"path": "warp", "relay": "bad relay id", "reason": "x" * 500}
    entry = entry_for("dev_b", odd, None, None, T0 + 50, float("nan"), T0)  # clock skew
    assert (entry.path, entry.relay, len(entry.reason)) == ("probing", None, 200)
    assert entry.handshake_age == 0 and entry.rtt_ms is None and entry.path_mtu is None
    never = entry_for("dev_b", None, None, None, None, 10**9, T0)
    assert never.handshake_age is None and never.rtt_ms == 600_000
    for e in (entry, never):
        doc = json.loads(json.dumps({"type": "paths", "paths": [dataclasses.asdict(e)]}))
        read_paths(doc)  # the gateway's own check passes


def test_sent_on_change_at_most_every_min_interval() -> None:
    a = entry_for("a", PATH, RESULT, None, T0, None, T0)
    b = dataclasses.replace(a, peer="b")
    reporter = PathReporter(min_interval=10, refresh=300)
    first = reporter.due([a, b], T0)
    assert [[e["peer"] for e in m["paths"]] for m in first] == [["a", "b"]]
    assert reporter.due([a, b], T0 + 20) == []  # nothing changed
    aged = dataclasses.replace(a, handshake_age=99.0, rtt_ms=3.0)
    assert reporter.due([aged, b], T0 + 30) == []  # age and RTT alone are not a change
    worse = dataclasses.replace(b, path_mtu=1280)
    assert reporter.due([a, worse], T0 + 35) != [] and reporter.due([a, b], T0 + 40) == []
    changed = reporter.due([a, b], T0 + 45)  # b back to 1340: a change again
    assert [[e["peer"] for e in m["paths"]] for m in changed] == [["b"]]
    assert [[e["peer"] for e in m["paths"]] for m in reporter.due([a, b], T0 + 400)] == [
        ["a", "b"]]  # fmt: skip
    reporter.restart()
    assert reporter.due([a], T0 + 401) != []


def test_many_peers_go_in_several_messages() -> None:
    entry = entry_for("p", PATH, RESULT, None, T0, None, T0)
    many = [dataclasses.replace(entry, peer=f"p{i}") for i in range(MAX_PATH_ENTRIES + 3)]
    messages = PathReporter().due(many, T0)
    assert [len(m["paths"]) for m in messages] == [MAX_PATH_ENTRIES, 3]
    assert sum(len(read_paths(m).entries) for m in messages) == len(many)


def test_a_stream_closed_over_a_report_turns_reports_off() -> None:
    entry = entry_for("p", PATH, RESULT, None, T0, None, T0)
    reporter = PathReporter()
    assert not reporter.stream_ended(POLICY_VIOLATION)  # nothing sent on that stream
    assert reporter.due([entry], T0) != []
    assert not reporter.stream_ended(1006)  # gone for another reason: keep reporting
    reporter.restart()
    assert reporter.due([entry], T0 + 1) != []
    assert reporter.stream_ended(POLICY_VIOLATION) and reporter.refused
    reporter.restart()
    assert not reporter.may_send(T0 + 1000) and reporter.due([entry], T0 + 1000) == []

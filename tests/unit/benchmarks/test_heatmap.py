"""The heatmap benchmark's inputs: the policy it puts in force, each device's peers
under it, and reports the gateway's codec accepts."""

from __future__ import annotations

from benchmarks.heatmap import GROUP, group_peers, policy, report
from identity.policy_file import parse_policy_text
from wiregate.pathwire import parse_paths


def test_the_policy_has_one_rule_per_group() -> None:
    parsed = parse_policy_text(policy(63), "yaml")
    assert len(parsed.policy.rules) == 63


def test_each_device_peers_with_the_others_of_its_group() -> None:
    ids = [f"dev_{i:04d}" for i in range(40)]  # two full groups and one of 8
    peers = group_peers(ids)
    assert peers[0] == ids[1:GROUP] and peers[17] == ids[16:17] + ids[18:32]
    assert peers[39] == ids[32:39]
    assert all(len(p) == GROUP - 1 for p in peers[:32])


def test_a_report_is_one_the_gateway_reads() -> None:
    peers = [f"dev_{i:04d}" for i in range(1, GROUP)]
    for minute in range(5):
        parsed = parse_paths(report(minute, 0, peers))
        assert [e.peer for e in parsed.entries] == peers
        kinds = {e.path for e in parsed.entries}
        assert kinds == {"direct", "relayed"}
        assert all((e.relay is not None) == (e.path == "relayed") for e in parsed.entries)

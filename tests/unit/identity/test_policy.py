"""The tag ACL: matching, symmetry, memoization and the dict form's errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.policy import Policy, Rule
from wiregate.errors import BadInput, ConfigError

TAGS = ["tag:a", "tag:b", "tag:c"]


def rule(src: list[str], dst: list[str]) -> Rule:
    return Rule(src=frozenset(src), dst=frozenset(dst))


def test_allow_all_peers_untagged_devices() -> None:
    assert Policy.allow_all().may_peer((), ())
    assert Policy.allow_all().may_peer(["tag:a"], [])


def test_empty_policy_denies() -> None:
    assert not Policy(rules=()).may_peer(["tag:a"], ["tag:a"])


def test_one_way_rule_peers_both_ways() -> None:
    policy = Policy(rules=(rule(["tag:web"], ["tag:db"]),))
    assert policy.may_peer({"tag:web"}, {"tag:db"})
    assert policy.may_peer({"tag:db"}, {"tag:web"})
    assert not policy.may_peer({"tag:web"}, {"tag:web"})
    assert not policy.may_peer({"tag:db"}, {"tag:db"})


def test_any_tag_of_a_device_matches() -> None:
    policy = Policy(rules=(rule(["tag:web"], ["*"]),))
    assert policy.may_peer({"tag:x", "tag:web"}, set())
    assert not policy.may_peer({"tag:x"}, {"tag:y"})


def test_results_are_memoized_per_pair() -> None:
    policy = Policy(rules=(rule(["tag:a"], ["tag:b"]),))
    assert policy.may_peer(("tag:a",), ("tag:b",))
    assert policy._cache[(frozenset({"tag:b"}), frozenset({"tag:a"}))] is True


def test_from_dict_reads_the_legacy_form() -> None:
    data = {"rules": [{"src": ["tag:a"], "dst": ["*", "tag:b"]}]}
    policy = Policy.from_dict(data)
    assert policy == Policy(rules=(rule(["tag:a"], ["tag:b", "*"]),))


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ([], "policy:"),
        ({"rule": []}, "policy: unknown field 'rule'"),
        ({"rules": {}}, "policy.rules:"),
        ({"rules": ["x"]}, "policy.rules[0]:"),
        ({"rules": [{"src": ["*"]}]}, "policy.rules[0].dst:"),
        ({"rules": [{"src": ["*"], "dst": []}]}, "policy.rules[0].dst:"),
        ({"rules": [{"src": ["*"], "dst": ["*"], "x": 1}]}, "policy.rules[0]: unknown field"),
        (
            {"rules": [{"src": ["*"], "dst": ["*"]}, {"src": ["db"], "dst": ["*"]}]},
            "policy.rules[1].src[0]: 'db'",
        ),
        ({"rules": [{"src": [3], "dst": ["*"]}]}, "policy.rules[0].src[0]"),
    ],
)
def test_from_dict_names_the_offending_field(data: Any, path: str) -> None:
    with pytest.raises(BadInput) as info:
        Policy.from_dict(data)
    assert info.value.message.startswith(path)


def test_from_dict_raises_the_requested_error() -> None:
    with pytest.raises(ConfigError, match=r"policy\.rules"):
        Policy.from_dict({"rules": None}, error=ConfigError)


tagsets = st.frozensets(st.sampled_from(TAGS))
entries = st.frozensets(st.sampled_from([*TAGS, "*"]), min_size=1)
policies = st.lists(st.builds(Rule, src=entries, dst=entries), max_size=4).map(
    lambda rules: Policy(rules=tuple(rules))
)


@given(policies, tagsets, tagsets)
def test_may_peer_is_symmetric_and_matches_the_rules(
    policy: Policy, a: frozenset[str], b: frozenset[str]
) -> None:
    def reaches(x: frozenset[str], y: frozenset[str]) -> bool:
        return any(
            ("*" in r.src or r.src & x) and ("*" in r.dst or r.dst & y) for r in policy.rules
        )

    expected = reaches(a, b) or reaches(b, a)
    assert policy.may_peer(a, b) == expected
    assert policy.may_peer(b, a) == expected

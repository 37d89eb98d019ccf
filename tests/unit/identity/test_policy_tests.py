"""Tests inside the policy file: their syntax, the runner, refusals, ``policy check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from identity.policy_file import parse_policy, parse_policy_text
from identity.policy_tests import run_tests
from wiregate.cli.main import main
from wiregate.errors import ConfigError

IDP = "https://idp.example.com"
BASE: dict[str, Any] = {
    "groups": {"eng": {"issuer": IDP, "claim": "groups", "values": ["engineering"]}},
    "acls": [
        {"src": ["group:eng"], "dst": ["tag:db"], "ports": ["tcp:5432", "icmp", "udp:8000-8010"]},
        {"src": ["tag:web"], "dst": ["tag:db"]},
    ],
}


def doc(*tests: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "tests": list(tests)}


def failures(*tests: dict[str, Any]) -> list[str]:
    return parse_policy(doc(*tests), check_tests=False).failures()


def test_passing_tests_load_and_are_counted() -> None:
    document = parse_policy(
        doc(
            {"src": "group:eng", "accept": ["tag:db:5432", "tag:db:tcp:5432", "tag:db:icmp",
                                            "tag:db:udp:8000-8010"],
             "deny": ["tag:db:22", "tag:db:udp:5432", "tag:db:udp:8011", "tag:web:80"]},
            {"src": ["tag:web", "tag:x"], "accept": ["tag:db:*", "tag:db:udp"]},
            {"src": "tag:db", "deny": ["group:eng:*", "tag:web:*"]},  # replies only
        )
    )  # fmt: skip
    assert len(document.tests) == 3 and document.failures() == []
    assert "tests: 3" in document.summary()


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ({"src": "group:eng", "accept": ["tag:db:22"]},
         "tests[0] (src group:eng): tag:db:22 should be accepted but is denied"),
        ({"src": "group:eng", "deny": ["tag:db:icmp"]},
         "tests[0] (src group:eng): tag:db:icmp should be denied but is accepted"),
        ({"src": "group:eng", "accept": ["tag:db:*"]},  # only some ports: not everything
         "tests[0] (src group:eng): tag:db:* should be accepted but is denied"),
        ({"src": "group:eng", "accept": ["tag:db:udp:8000-8011"]},  # one port short
         "tests[0] (src group:eng): tag:db:udp:8000-8011 should be accepted but is denied"),
        ({"src": "group:eng", "deny": ["tag:db:udp:7990-8000"]},  # overlaps at 8000
         "tests[0] (src group:eng): tag:db:udp:7990-8000 should be denied but is accepted"),
        ({"src": "tag:vm", "accept": ["tag:db:5432"]},  # no rule: not even peering
         "tests[0] (src tag:vm): tag:db:5432 should be accepted but is denied"),
    ],
)  # fmt: skip
def test_a_failing_expectation_names_its_test(test: dict[str, Any], expected: str) -> None:
    assert failures(test) == [expected]
    with pytest.raises(ConfigError) as refused:
        parse_policy(doc(test))
    assert refused.value.message == f"policy test failed: {expected}"


def test_every_failure_is_listed_and_the_refusal_counts_the_rest() -> None:
    tests = ({"src": "tag:web", "deny": ["tag:db:1", "tag:db:2"]},
             {"src": "tag:vm", "accept": ["tag:db:3"]})  # fmt: skip
    assert len(failures(*tests)) == 3
    with pytest.raises(ConfigError) as refused:
        parse_policy(doc(*tests))
    assert refused.value.hint == "2 more failed; 'wiregate policy check FILE' lists them"


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ({"src": "tag:a"}, "tests[0]: give 'accept', 'deny' or both"),
        ({"accept": ["tag:db:1"]}, "tests[0]: missing 'src'"),
        ({"src": "tag:a", "accept": [], "expect": []}, "tests[0]: unknown field 'expect'"),
        ({"src": "group:ops", "accept": []}, 'tests[0].src: unknown group "ops"'),
        ({"src": ["tag:a", "x"], "accept": []}, "tests[0].src[1]: 'x' is neither"),
        ({"src": [], "accept": []}, "tests[0].src: expected a principal or a non-empty list"),
        ({"src": "tag:a", "accept": "tag:db:1"}, "tests[0].accept: expected a list"),
        ({"src": "tag:a", "accept": ["tag:db"]}, "tests[0].accept[0]: 'tag:db' is not DST:PORT"),
        ({"src": "tag:a", "deny": ["tag:db:70000"]}, "tests[0].deny[0]: 'tcp:70000': ports are"),
        ({"src": "tag:a", "deny": ["tag:db:icmp:1"]}, "tests[0].deny[0]: 'icmp:1': icmp takes"),
        ({"src": "tag:a", "deny": ["group:ops:1"]}, 'tests[0].deny[0]: unknown group "ops"'),
        ({"src": "tag:a", "deny": ["*:1"]}, "tests[0].deny[0]: '*:1' is not DST:PORT"),
        ("tag:a", "tests[0]: expected a mapping"),
    ],
)  # fmt: skip
def test_bad_tests_are_refused_with_their_path(tests: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_policy(doc(tests))
    assert refused.value.message.startswith(message)


def test_tests_must_be_a_list_and_the_legacy_form_has_none() -> None:
    with pytest.raises(ConfigError, match="tests: expected a list"):
        parse_policy({**BASE, "tests": {"src": "tag:a"}})
    with pytest.raises(ConfigError, match="legacy form"):
        parse_policy({"rules": [{"src": ["*"], "dst": ["*"]}], "tests": []})


def test_the_runner_on_a_legacy_policy_sees_everything_open() -> None:
    legacy = parse_policy({"rules": [{"src": ["tag:a"], "dst": ["tag:b"]}]})
    tests = parse_policy(doc({"src": "tag:a", "accept": ["tag:b:*"], "deny": ["tag:c:1"]}),
                         check_tests=False).tests  # fmt: skip
    assert run_tests(legacy.policy, tests) == []


def test_yaml_and_json_text_parse_to_the_same_document() -> None:
    data = doc({"src": "group:eng", "accept": ["tag:db:5432"]})
    assert parse_policy_text(yaml.safe_dump(data), "yaml") == parse_policy_text(
        json.dumps(data), "json"
    )
    with pytest.raises(ConfigError, match=r"does not parse: .*\(line 2, column 1\)$"):
        parse_policy_text("acls: [\n", "yaml")
    with pytest.raises(ConfigError, match="unknown format 'xml'"):
        parse_policy_text("", "xml")


def test_policy_check_runs_the_tests(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(doc({"src": "group:eng", "accept": ["tag:db:5432"]})))
    result = CliRunner().invoke(main, ["policy", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "tests: 1" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc({"src": "group:eng", "accept": ["tag:db:22", "tag:db:23"]})))
    result = CliRunner().invoke(main, ["policy", "check", str(bad)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines == [
        "error: policy test failed: tests[0] (src group:eng): tag:db:22 should be accepted "
        "but is denied",
        "error: policy test failed: tests[0] (src group:eng): tag:db:23 should be accepted "
        "but is denied",
        f"{bad}: 2 of the policy's test expectations failed",
    ]


POD_ACLS: dict[str, Any] = {
    "acls": [
        {"src": [{"pods": {"namespace": "payments", "labels": {"app": "ledger"}},
                  "nodes": ["tag:node"]}], "dst": ["tag:db"], "ports": ["tcp:5432"]},
        {"src": ["tag:node"], "dst": ["tag:db"], "ports": ["icmp"]},
    ]
}  # fmt: skip


def pod_failures(*tests: dict[str, Any]) -> list[str]:
    return parse_policy({**POD_ACLS, "tests": list(tests)}, check_tests=False).failures()


def test_a_pod_source_opens_what_its_node_and_the_pod_rules_allow() -> None:
    ledger = {"namespace": "payments", "service_account": "ledger", "labels": {"app": "ledger"}}
    assert pod_failures(
        {"src": {"pod": ledger, "node": "tag:node"},
         "accept": ["tag:db:5432", "tag:db:icmp"], "deny": ["tag:db:22"]},
        {"src": {"pod": {**ledger, "labels": {}}, "node": "tag:node"},
         "accept": ["tag:db:icmp"], "deny": ["tag:db:5432"]},
        {"src": {"pod": ledger, "node": ["tag:edge"]}, "deny": ["tag:db:*"]},
    ) == []  # fmt: skip
    (failure,) = pod_failures(
        {"src": {"pod": ledger, "node": "tag:edge"}, "accept": ["tag:db:5432"]}
    )
    assert failure.startswith("tests[0] (src pod payments/ledger on tag:edge): tag:db:5432")


@pytest.mark.parametrize(
    ("src", "said"),
    [
        ({"pod": {"namespace": "a"}, "node": "tag:node"}, "tests[0].src.pod: expected"),
        ({"pod": {"namespace": "a", "service_account": "b"}}, "tests[0].src.node: missing"),
        ({"pod": {"namespace": "a", "service_account": ""}, "node": "tag:n"}, "non-empty"),
        ({"pod": {"namespace": "a", "service_account": "b"}, "node": "x"}, "tests[0].src.node"),
    ],
)
def test_a_bad_pod_source_is_refused_naming_the_place(src: Any, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pod_failures({"src": src, "accept": ["tag:db:5432"]})
    assert said in str(caught.value)

"""The policy file: loading and its errors, claims to groups and tags, routes, key expiry."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from click.testing import CliRunner

from identity.claims import Claims
from identity.policy import principals
from identity.policy_file import load_policy_file, parse_policy
from identity.principals import (
    Grant,
    enrollment_grant,
    grant_for,
    key_lifetime,
    lifetime_rule,
    stored_tags,
)
from wiregate.cli.main import main
from wiregate.errors import ConfigError
from wiregate.model import Identity
from wiregate.ports import PortSpec, parse_port

IDP = "https://idp.example.com"
KUBE = "https://kubernetes.default.svc"

DOC: dict[str, Any] = {
    "groups": {
        "eng": {"issuer": IDP, "claim": "groups", "values": ["engineering"]},
        "admins": {"issuer": IDP, "claim": "email", "values": ["alice@example.com"]},
    },
    "tag_rules": [
        {
            "issuer": KUBE,
            "claim": "sub",
            "match": "system:serviceaccount:wiregate:*",
            "tags": ["tag:node"],
        },
        {"group": "eng", "tags": ["tag:laptop"]},
    ],
    "acls": [
        {"src": ["group:eng"], "dst": ["tag:db"], "ports": ["tcp:5432", "icmp"]},
        {"src": ["tag:node"], "dst": ["tag:node", "tag:vm"]},
    ],
    "routes": [{"tags": ["tag:node"], "allow": ["10.244.0.0/16", "fd00:244::/48"]}],
    "key_expiry": {"default": "180d", "tag:node": "never", "tag:laptop": "30d"},
}


def with_(path: str, value: Any) -> dict[str, Any]:
    """DOC with the dotted ``path`` (list indexes as numbers) set to ``value``."""
    doc = json.loads(json.dumps(DOC))
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def claims(issuer: str = IDP, subject: str = "u1", **raw: Any) -> Claims:
    payload = {"iss": issuer, "sub": subject, **raw}
    return Claims(issuer, subject, ("wiregate",), 2e9, 1e9, None, None, None,
                  MappingProxyType(payload))  # fmt: skip


def test_the_example_document_loads() -> None:
    doc = parse_policy(DOC)
    assert set(doc.groups) == {"eng", "admins"}
    assert doc.policy.directional
    first = doc.policy.rules[0]
    assert first.ports == (PortSpec("tcp", 5432, 5432), PortSpec("icmp"))
    assert doc.key_expiry == {
        "default": 180 * 86400.0,
        "tag:node": None,
        "tag:laptop": 30 * 86400.0,
    }
    assert "acls: 2 (1 restricted to ports)" in doc.summary()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (None, "(document): expected a mapping"),
        ({"acl": []}, "(document): unknown field 'acl'"),
        ({"rules": [], "acls": []}, "(document): 'rules' is the legacy form"),
        (with_("acls.1.dst.0", "group:ops"), 'acls[1].dst[0]: unknown group "ops"'),
        (with_("acls.1.dst.0", "db"), "acls[1].dst[0]: 'db' is neither"),
        (with_("acls.1.src", []), "acls[1].src: expected a non-empty list"),
        (with_("acls.0.ports.1", "tcp:0"), "acls[0].ports[1]: 'tcp:0': ports are 1-65535"),
        (with_("acls.0.ports.1", "icmp:8"), "acls[0].ports[1]: 'icmp:8': icmp takes no port"),
        (with_("acls.0.ports.0", "sctp:1"), "acls[0].ports[0]: 'sctp:1' is not a port spec"),
        (with_("acls.0.ports", []), "acls[0].ports: expected a non-empty list"),
        (with_("acls.0", {"src": ["*"]}), "acls[0]: missing 'dst'"),
        (with_("acls.0", {"src": ["*"], "dst": ["*"], "port": []}), "acls[0]: unknown field"),
        (with_("groups.eng.claim", "preferred_username"), "groups.eng.claim: the claim"),
        (with_("groups.eng.issuer", "http://idp.example.com"), "groups.eng.issuer"),
        (with_("groups.eng.values", "engineering"), "groups.eng.values: expected a non-empty"),
        (with_("groups.eng", {"issuer": IDP, "claim": "groups"}), "groups.eng: missing 'values'"),
        (with_("groups", {"Eng!": {}}), "groups: 'Eng!' is not a group name"),
        (with_("tag_rules.1.group", "ops"), 'tag_rules[1].group: unknown group "ops"'),
        (with_("tag_rules.1.tags.0", "laptop"), "tag_rules[1].tags[0]: 'laptop' is not a tag"),
        (with_("tag_rules.0.values", ["x"]), "tag_rules[0]: give exactly one of"),
        (with_("tag_rules.0.match", ""), "tag_rules[0].match: expected a non-empty glob"),
        (with_("tag_rules.1.issuer", IDP), "tag_rules[1]: 'group' cannot be combined"),
        (with_("routes.0.allow.0", "10.244.0.1/16"), "routes[0].allow[0]: '10.244.0.1/16'"),
        (with_("routes.0.allow.1", 7), "routes[0].allow[1]: expected a CIDR"),
        (with_("routes.0.tags.0", "group:nope"), 'routes[0].tags[0]: unknown group "nope"'),
        (with_("key_expiry.default", "180"), "key_expiry.default: '180' is not a duration"),
        (with_("key_expiry.default", "0d"), "key_expiry.default: '0d' is not a duration"),
        (with_("key_expiry.node", "1d"), "key_expiry: 'node' is neither"),
        ({"rules": [{"src": ["db"], "dst": ["*"]}]}, "policy.rules[0].src[0]: 'db'"),
    ],
)
def test_errors_name_the_path_in_the_document(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(doc)
    assert info.value.message.startswith(message), info.value.message


def test_the_legacy_form_is_accepted_unfiltered() -> None:
    doc = parse_policy({"rules": [{"src": ["tag:web"], "dst": ["tag:db"]}]})
    assert doc.legacy and not doc.policy.directional and doc.policy.routes is None
    web, db = frozenset({"tag:web"}), frozenset({"tag:db"})
    assert doc.policy.may_peer(db, web)
    assert doc.policy.reach(web, db) is None  # legacy peers reach each other on everything


def test_files_yaml_json_and_duplicate_keys(tmp_path: Path) -> None:
    yml = tmp_path / "p.yaml"
    yml.write_text("acls:\n  - {src: ['*'], dst: ['*'], ports: [icmp]}\n")
    assert load_policy_file(yml).policy.rules[0].ports == (PortSpec("icmp"),)
    js = tmp_path / "p.json"
    js.write_text(json.dumps(DOC))
    assert load_policy_file(js) == parse_policy(DOC)
    dup = tmp_path / "d.yaml"
    dup.write_text("acls: []\nacls: []\n")
    with pytest.raises(ConfigError, match="duplicate key 'acls'"):
        load_policy_file(dup)
    unsafe = tmp_path / "u.yaml"
    unsafe.write_text("acls: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_policy_file(unsafe)
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy_file(tmp_path / "missing.yaml")


def test_cli_check_prints_the_error_or_a_summary(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(DOC))
    bad.write_text(json.dumps(with_("acls.1.dst.0", "group:ops")))
    runner = CliRunner()
    ok = runner.invoke(main, ["policy", "check", str(good)])
    assert ok.exit_code == 0 and "groups: 2 (admins, eng)" in ok.output
    failed = runner.invoke(main, ["policy", "check", str(bad)])
    assert failed.exit_code == 1
    assert 'error: acls[1].dst[0]: unknown group "ops"' in failed.output


def test_ports_and_reach_are_directional() -> None:
    policy = parse_policy(DOC).policy
    laptop = principals(["tag:laptop"], ["eng"])
    db = frozenset({"tag:db"})
    assert policy.may_peer(db, laptop) and policy.may_peer(laptop, db)
    assert policy.reach(db, laptop) == ("icmp", "tcp:5432")  # the laptop may open these on db
    assert policy.reach(laptop, db) == ()  # the db may open nothing on the laptop
    node = frozenset({"tag:node"})
    assert policy.reach(node, node) is None
    assert not policy.may_peer(node, laptop)


def test_canonical_port_specs() -> None:
    assert str(parse_port("tcp:80-80")) == "tcp:80"
    assert str(parse_port("udp:1000-2000")) == "udp:1000-2000"
    assert str(parse_port("udp")) == "udp"
    for bad in ("tcp:2-1", "tcp:65536", "TCP:1", " tcp:1", 5):
        with pytest.raises(ValueError):
            parse_port(bad)


def test_routes_outside_the_approved_prefixes_are_refused() -> None:
    policy = parse_policy(DOC).policy
    node = frozenset({"tag:node"})
    routes = ("10.244.3.0/24", "10.0.0.0/8", "fd00:244:0:1::/64", "0.0.0.0/0", "junk")
    approved, refused = policy.approve_routes(node, routes)
    assert approved == ("10.244.3.0/24", "fd00:244:0:1::/64")
    assert refused == ("10.0.0.0/8", "0.0.0.0/0", "junk")
    assert policy.approve_routes(frozenset({"tag:vm"}), ("10.244.3.0/24",)) == (
        (),
        ("10.244.3.0/24",),
    )


def test_groups_and_tags_from_verified_claims_only() -> None:
    doc = parse_policy(DOC)
    eng = claims(groups=["engineering", "x"], email="alice@example.com", email_verified=True)
    assert enrollment_grant(doc, eng) == Grant(tags=("tag:laptop",), groups=("admins", "eng"))
    unverified = claims(email="alice@example.com", email_verified="true")
    assert enrollment_grant(doc, unverified) == Grant()
    other_issuer = claims("https://evil.example.com", groups=["engineering"])
    assert enrollment_grant(doc, other_issuer) == Grant()
    sa = claims(KUBE, "system:serviceaccount:wiregate:agent")
    assert enrollment_grant(doc, sa, ["tag:vm"]) == Grant(tags=("tag:node", "tag:vm"))
    assert enrollment_grant(doc, claims(KUBE, "system:serviceaccount:default:x")) == Grant()


def test_stored_tags_are_tags_then_groups() -> None:
    grant = Grant(tags=("tag:laptop",), groups=("eng",))
    assert stored_tags(grant) == ("tag:laptop", "group:eng")


def test_key_lifetime_by_tags() -> None:
    doc = parse_policy(DOC)
    assert key_lifetime(doc, ["tag:node"]) is None
    assert key_lifetime(doc, []) == 180 * 86400.0
    assert key_lifetime(doc, ["tag:node", "tag:laptop"]) == 30 * 86400.0
    assert key_lifetime(parse_policy({"acls": []}), ["tag:x"]) is None


def test_grant_from_a_verified_subset_and_the_store_rule() -> None:
    doc = parse_policy(DOC)
    grant = grant_for(doc, IDP, {"email": "alice@example.com", "groups": ("engineering",)})
    assert grant == Grant(tags=("tag:laptop",), groups=("admins", "eng"))
    assert grant_for(doc, IDP, {"groups": "engineering"}).groups == ("eng",)
    assert grant_for(doc, KUBE, {"groups": ["engineering"]}) == Grant()
    rule = lifetime_rule(doc)
    assert rule(Identity(IDP, "u1"), ["tag:node"]) is None
    assert rule(Identity(IDP, "u1"), ["group:eng"]) == 180 * 86400.0

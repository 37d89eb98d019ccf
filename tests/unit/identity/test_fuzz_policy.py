"""The policy loader under fuzzing: every outcome is a policy or a ConfigError naming a path.

Documents are arbitrary YAML/JSON values, or a valid document with one
structured mutation (a value replaced, a key deleted, renamed or added, a list
item dropped or duplicated). ``parse_policy`` either loads it or raises
:class:`ConfigError` whose message starts with the path in the document; when
the mutation was inside one ACL, tag rule, route rule or the key_expiry table,
the error names that entry. Texts (YAML, JSON, TOML, bytes that are not UTF-8)
go through ``load_policy_file`` with the same rule, and a valid document dumped
as YAML or JSON loads to the same policy as the document itself.
"""

from __future__ import annotations

import atexit
import copy
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identity.policy_file import PolicyFile, load_policy_file, parse_policy
from wiregate.errors import ConfigError

IDP = "https://idp.example.com"
DOC: dict[str, Any] = {
    "groups": {
        "eng": {"issuer": IDP, "claim": "groups", "values": ["engineering"]},
        "ops": {"issuer": "http://127.0.0.1:9000", "claim": "sub", "values": ["u1", "u2"]},
    },
    "tag_rules": [
        {"issuer": IDP, "claim": "sub", "match": "system:serviceaccount:*", "tags": ["tag:node"]},
        {"group": "eng", "tags": ["tag:laptop"]},
        {"issuer": IDP, "claim": "email", "values": ["a@example.com"], "tags": ["tag:vm"]},
    ],
    "acls": [
        {"src": ["group:eng"], "dst": ["tag:db"], "ports": ["tcp:5432", "icmp", "udp:1-9"]},
        {"src": ["tag:node"], "dst": ["tag:node", "tag:vm", "*"]},
    ],
    "routes": [{"tags": ["tag:node", "group:ops"], "allow": ["10.244.0.0/16", "fd00:244::/48"]}],
    "key_expiry": {"default": "180d", "tag:node": "never", "tag:laptop": "30d"},
}
SECTIONS = ("(document)", "groups", "tag_rules", "acls", "routes", "key_expiry", "policy")
# a section, then the rest of the path, then ": "
PATH = re.compile(rf"^({'|'.join(map(re.escape, SECTIONS))})([.\[].*?)?: ")
NEAR_VALID = [
    "tag:db", "tag:node", "group:eng", "group:ops", "group:nope", "*", "tcp:5432", "tcp",
    "icmp:1", "udp:0", "tcp:9-1", "10.0.0.0/8", "10.0.0.1/8", "::/0", "https://[", "http://x",
    IDP, "https://idp.example.com?x", "180d", "0d", "never", "sub", "name", "groups", "rules",
    "", "default", "src", "dst", "ports", "match", "values", "tags", "group", "allow",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(NEAR_VALID),
    st.binary(max_size=8),
    st.dates(),
)
keys = st.one_of(st.sampled_from(NEAR_VALID), st.text(max_size=10), st.integers(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def containers(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths of every list and mapping in ``doc`` (the document itself included)."""
    if isinstance(doc, dict):
        items: Any = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return []
    found = [path]
    for key, child in items:
        found += containers(child, (*path, key))
    return found


def at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Any, tuple[Any, ...]]:
    """DOC with one mutation, and the path of the container it happened in."""
    doc = copy.deepcopy(DOC)
    path = draw(st.sampled_from(containers(doc)))
    node = at(doc, path)
    slots = list(node) if isinstance(node, dict) else list(range(len(node)))
    op = draw(st.sampled_from(["replace", "delete", "add", "rename", "dup"]))
    slot = draw(st.sampled_from(slots)) if slots else None
    if op == "replace" and slot is not None:
        node[slot] = draw(values)
        return doc, (*path, slot)
    if op == "delete" and slot is not None:
        del node[slot]
    elif op == "dup" and isinstance(node, list) and node:
        node.append(copy.deepcopy(node[slot]))
    elif op == "rename" and isinstance(node, dict) and slot is not None:
        node[draw(keys.filter(lambda k: k not in node))] = node.pop(slot)
    elif isinstance(node, dict):
        node[draw(keys)] = draw(values)
    else:
        node.insert(draw(st.integers(0, len(node))), draw(values))
    return doc, path


def expected_prefix(path: tuple[Any, ...]) -> str | None:
    """The path an error must start with after a mutation at ``path`` (None: any path)."""
    if len(path) >= 2 and path[0] in ("tag_rules", "acls", "routes"):
        return f"{path[0]}[{path[1]}]"
    if len(path) >= 1 and path[0] == "key_expiry":
        return "key_expiry"
    return None


def loads_or_names_a_path(doc: Any, prefix: str | None = None) -> PolicyFile | None:
    try:
        loaded = parse_policy(doc)
    except ConfigError as exc:
        assert PATH.match(exc.message), exc.message
        assert prefix is None or exc.message.startswith(prefix), (prefix, exc.message)
        return None
    loaded.summary()
    return loaded


def test_the_document_loads() -> None:
    """The mutations below start from it: it must be valid."""
    loaded = parse_policy(DOC)
    assert len(loaded.policy.rules) == 2 and set(loaded.groups) == {"eng", "ops"}


@settings(max_examples=300)
@given(mutated())
def test_mutated_documents_load_or_name_the_changed_entry(case: tuple[Any, tuple]) -> None:  # type: ignore[type-arg]
    doc, path = case
    loads_or_names_a_path(doc, expected_prefix(path))


@given(values)
def test_arbitrary_values_load_or_name_a_path(doc: Any) -> None:
    loads_or_names_a_path(doc)


@given(st.dictionaries(st.sampled_from([*SECTIONS[1:6], "rules"]), values, max_size=4))
def test_arbitrary_sections_load_or_name_a_path(doc: dict[str, Any]) -> None:
    loads_or_names_a_path(doc)


# --- through files ------------------------------------------------------------------

WORK = Path(tempfile.mkdtemp(prefix="wiregate-policy-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def load_text(data: bytes, suffix: str) -> PolicyFile | None:
    path = WORK / f"policy{suffix}"
    path.write_bytes(data)
    try:
        return load_policy_file(path)
    except ConfigError as exc:
        named = exc.message.startswith(f"policy file {path} does not parse")
        assert named or PATH.match(exc.message), exc.message
        return None


def jsonable(doc: Any) -> bool:
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_documents_as_yaml_and_json_load_like_the_document(
    case: tuple[Any, tuple],  # type: ignore[type-arg]
) -> None:
    doc, _ = case
    direct = loads_or_names_a_path(doc)
    via_yaml = load_text(yaml.safe_dump(doc).encode(), ".yaml")
    assert via_yaml == direct
    if jsonable(doc):
        via_json = load_text(json.dumps(doc).encode(), ".json")
        assert (via_json is None) == (direct is None)


text_edit = st.tuples(st.integers(0, 10_000), st.integers(0, 5), st.text(max_size=5))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.lists(text_edit, min_size=1, max_size=3), st.sampled_from([".yaml", ".json"]))
def test_edited_policy_texts_load_or_name_a_path(
    case: tuple[Any, tuple],  # type: ignore[type-arg]
    edits: list[tuple[int, int, str]],
    suffix: str,
) -> None:
    doc, _ = case
    text = yaml.safe_dump(doc) if suffix == ".yaml" or not jsonable(doc) else json.dumps(doc)
    for where, cut, insert in edits:
        i = where % (len(text) + 1)
        text = text[:i] + insert + text[i + cut :]
    load_text(text.encode("utf-8", "surrogatepass"), suffix)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.sampled_from([".yaml", ".yml", ".json", ".toml"]))
def test_arbitrary_bytes_load_or_name_a_path(data: bytes, suffix: str) -> None:
    load_text(data, suffix)


# --- regressions found by fuzzing ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "suffix"),
    [
        # a YAML mapping key that is a list or a mapping: TypeError (unhashable)
        (b"? [a]\n: 1\n", ".yaml"),
        (b"acls: []\nkey_expiry: {{a: 1}: 1d}\n", ".yaml"),
        # deeper nesting than the YAML composer or the JSON decoder can follow: RecursionError
        (b"[" * 5000, ".yaml"),
        (b"[" * 100_000, ".json"),
        # not UTF-8: UnicodeDecodeError from reading the file
        (b"\xff\xfe", ".yaml"),
    ],
)
def test_regression_texts_refused_with_config_error(data: bytes, suffix: str) -> None:
    assert load_text(data, suffix) is None


def test_regression_issuer_errors_are_path_colon_message() -> None:
    """atheris (scripts/fuzz.sh): the issuer's URL errors read ``groups.eng.issuer "https:'/..."
    must be...``, with no ``:`` after the path, unlike every other error of the file."""
    data = (
        b"acls:\n- dst:\n  - tag:db\n  ports:\n  - tcp:5432\n  - icmp\n  - udp:1-9\n  src:\n"
        b"  - group:eng\n- dst:\n  - tag:node\n  - '*'\n  src:\n  - tqg:node\ngroups:\n  eng:\n"
        b"    claim: groups\n    issuer: https:'/idp.example.com\n    values:\n    - engineering\n"
        b"key_expiry:\n  defaulgroup: eng\n  tags:\n  - tag:laptop\n"
    )
    path = WORK / "policy.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=r"^groups\.eng\.issuer: \"https:'/idp"):
        load_policy_file(path)


def test_regression_issuer_that_is_not_a_url_names_its_path() -> None:
    """``https://[`` made urlsplit raise ValueError (an issuer is checked as a URL)."""
    doc = {"groups": {"eng": {"issuer": "https://[", "claim": "sub", "values": ["a"]}}}
    with pytest.raises(ConfigError, match=r"^groups\.eng\.issuer"):
        parse_policy(doc)

"""The policy file: groups, tag rules, ACLs with ports, route approval, key expiry (pure).

The document (YAML or JSON; see ``docs/policy.md``)::

    groups:
      eng: {issuer: "https://idp.example.com", claim: groups, values: [engineering]}
    tag_rules:
      - {issuer: "https://kubernetes.default.svc", claim: sub,
         match: "system:serviceaccount:wiregate:*", tags: [tag:node]}
      - {group: eng, tags: [tag:laptop]}
    acls:
      - {src: [group:eng], dst: [tag:db], ports: ["tcp:5432", "icmp"]}
      - {src: [tag:node], dst: [tag:node, tag:vm]}
      - {src: [{pods: {namespace: payments, labels: {app: ledger}}, nodes: [tag:node]}],
         dst: [tag:db], ports: ["tcp:5432"]}
    routes:
      - {tags: [tag:node], allow: ["10.244.0.0/16"]}
    key_expiry: {default: 180d, "tag:node": never}
    tests:
      - {src: group:eng, accept: ["tag:db:5432"], deny: ["tag:db:22"]}

:func:`parse_policy` validates every field and raises :class:`ConfigError`
naming the path inside the document (``acls[2].dst[0]: unknown group "ops"``),
then runs the document's ``tests`` (:mod:`identity.policy_tests`) and refuses
it when one fails, naming the test.
The legacy form ``{"rules": [...]}`` is still accepted (every port, every
route approved). :func:`load_policy_file` reads a file and
:func:`parse_policy_text` a document's text (YAML with ``yaml.safe_load``
semantics and duplicate keys refused, JSON, or legacy TOML);
:func:`policy_hash` is the SHA-256 a document is known by (audit, API, store).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from identity.claims import check_url
from identity.policy import ANY, GROUP_PREFIX, PodRule, PodSelector, Policy, RouteRule, Rule
from identity.policy_tests import PolicyTest, parse_tests, run_tests
from wiregate.errors import ConfigError
from wiregate.ports import PortSpec, parse_port

__all__ = [
    "FORMATS",
    "NEVER",
    "Group",
    "PolicyFile",
    "TagRule",
    "format_of",
    "load_policy_file",
    "parse_duration",
    "parse_policy",
    "parse_policy_text",
    "policy_hash",
]

NEVER = None  # a key_expiry value: the device key does not expire
_TAG = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_K8S_NAME = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_CLAIM = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_DURATION = re.compile(r"^([0-9]{1,6})([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Claims an end user (or a careless IdP) can set: never a basis for authorization.
UNSAFE_CLAIMS = frozenset(
    {"preferred_username", "name", "nickname", "given_name", "family_name", "middle_name",
     "email_verified", "phone_number", "phone_number_verified", "picture", "profile",
     "website", "locale", "zoneinfo", "nonce", "aud", "azp", "exp", "iat", "nbf"}
)  # fmt: skip
_TOP = ("groups", "tag_rules", "acls", "routes", "key_expiry", "tests")
FORMATS = ("yaml", "json", "toml")


@dataclass(frozen=True, slots=True)
class Group:
    """Identities of ``issuer`` whose ``claim`` holds one of ``values``."""

    name: str
    issuer: str
    claim: str
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class TagRule:
    """Tags granted at enrollment: to members of ``group``, or on a claim of ``issuer``.

    A claim rule matches when the claim's value (or one of them, for a list)
    is in ``values`` or matches the glob ``match`` (``*`` any run, ``?`` one
    character).
    """

    tags: tuple[str, ...]
    group: str | None = None
    issuer: str | None = None
    claim: str | None = None
    match: str | None = None
    values: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A loaded policy document: the evaluated :class:`Policy` and the enrollment rules.

    ``key_expiry`` maps ``"default"`` and tags to seconds (None: never).
    """

    policy: Policy
    groups: Mapping[str, Group] = field(default_factory=dict)
    tag_rules: tuple[TagRule, ...] = ()
    key_expiry: Mapping[str, float | None] = field(default_factory=dict)
    legacy: bool = False
    tests: tuple[PolicyTest, ...] = ()

    def failures(self) -> list[str]:
        """One line per failed expectation of the document's ``tests`` (empty: all pass)."""
        return run_tests(self.policy, self.tests)

    def summary(self) -> str:
        """One line per section, for ``wiregate policy check``."""
        ported = sum(1 for r in self.policy.rules if r.ports is not None)
        routes = "all approved" if self.policy.routes is None else len(self.policy.routes)
        lines = [
            f"form: {'legacy rules' if self.legacy else 'policy file'}",
            f"groups: {len(self.groups)} ({', '.join(sorted(self.groups)) or '-'})",
            f"tag_rules: {len(self.tag_rules)}",
            f"acls: {len(self.policy.rules)} ({ported} restricted to ports)",
            f"pod rules: {len(self.policy.pods)}",
            f"routes: {routes}",
            f"key_expiry: {_expiry_text(self.key_expiry)}",
            f"tests: {len(self.tests)}",
        ]
        return "\n".join(lines)


def _expiry_text(expiry: Mapping[str, float | None]) -> str:
    if not expiry:
        return "-"
    return ", ".join(f"{k}={'never' if v is None else f'{v:.0f}s'}" for k, v in expiry.items())


def format_of(path: Path) -> str:
    """The document format a file's name says: ``json``, ``toml`` (legacy) or ``yaml``."""
    return {".json": "json", ".toml": "toml"}.get(path.suffix, "yaml")


def policy_hash(text: str) -> str:
    """The SHA-256 (hex) of a policy document's text, as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_policy_file(path: Path, *, check_tests: bool = True) -> PolicyFile:
    """Read and validate the policy file at ``path``; :class:`ConfigError` if anything is off."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except ValueError as exc:
        raise ConfigError(f"policy file {path} does not parse: {exc}") from None
    return parse_policy_text(text, format_of(path), f"policy file {path}", check_tests=check_tests)


def parse_policy_text(
    text: str, fmt: str, where: str = "the policy", *, check_tests: bool = True
) -> PolicyFile:
    """Parse and validate a document in ``fmt`` (one of :data:`FORMATS`); ``where`` names
    it in a parse error."""
    try:
        if fmt == "toml":
            data: Any = tomllib.loads(text)
        elif fmt == "json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        elif fmt == "yaml":
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        else:
            raise ConfigError(f"{where}: unknown format {fmt!r}", hint=f"one of {list(FORMATS)}")
    except (ValueError, yaml.YAMLError, RecursionError) as exc:  # Recursion: nested too deep
        raise ConfigError(f"{where} does not parse: {_one_line(exc)}") from None
    return parse_policy(data, check_tests=check_tests)


def _one_line(exc: Exception) -> str:
    """A parser's complaint on one line: YAML's own spans several, with a caret."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem or exc.context} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, refusing a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # the SafeLoader refuses it ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_policy(data: Any, *, check_tests: bool = True) -> PolicyFile:
    """Validate a policy document (new or legacy form); :class:`ConfigError` names the path.

    With ``check_tests`` (the default) a document whose ``tests`` fail is refused, the
    error naming the first failure."""
    if isinstance(data, Mapping) and "rules" in data:
        if len(data) > 1:
            raise ConfigError(
                "(document): 'rules' is the legacy form and cannot be mixed with other sections",
                hint="write the rules as 'acls'",
            )
        return PolicyFile(policy=Policy.from_dict(data, error=ConfigError), legacy=True)
    doc = _mapping(data, "(document)", set(_TOP))
    groups = _groups(doc.get("groups", {}))
    tag_rules = tuple(
        _tag_rule(raw, f"tag_rules[{i}]", groups)
        for i, raw in enumerate(_list(doc.get("tag_rules", []), "tag_rules", empty=True))
    )
    acls: list[Rule] = []
    pods: list[PodRule] = []
    for i, raw in enumerate(_list(doc.get("acls", []), "acls", empty=True)):
        device_rules, pod_rules = _acl(raw, f"acls[{i}]", groups)
        acls.extend(device_rules)
        pods.extend(pod_rules)
    routes = tuple(
        _route_rule(raw, f"routes[{i}]", groups)
        for i, raw in enumerate(_list(doc.get("routes", []), "routes", empty=True))
    )
    document = PolicyFile(
        policy=Policy(rules=tuple(acls), routes=routes, directional=True, pods=tuple(pods)),
        groups=groups,
        tag_rules=tag_rules,
        key_expiry=_key_expiry(doc.get("key_expiry", {})),
        tests=parse_tests(doc.get("tests", []), _group_checker(groups)),
    )
    failures = document.failures() if check_tests else []
    if failures:
        more = len(failures) - 1
        raise ConfigError(
            f"policy test failed: {failures[0]}",
            hint=f"{more} more failed; 'wiregate policy check FILE' lists them" if more else None,
        )
    return document


def _group_checker(groups: Mapping[str, Group]) -> Callable[[str, str], None]:
    def check(name: str, path: str) -> None:
        _group_ref(name, path, groups)

    return check


# -- sections -------------------------------------------------------------------


def _groups(raw: Any) -> dict[str, Group]:
    doc = _mapping(raw, "groups", None)
    out: dict[str, Group] = {}
    for name, body in doc.items():
        path = f"groups.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"groups: {name!r} is not a group name",
                hint="lowercase letters, digits, '.', '_', '-'",
            )
        entry = _mapping(body, path, {"issuer", "claim", "values"})
        _require(entry, path, ("issuer", "claim", "values"))
        out[name] = Group(
            name=name,
            issuer=_issuer(entry["issuer"], f"{path}.issuer"),
            claim=_claim(entry["claim"], f"{path}.claim"),
            values=frozenset(_strings(entry["values"], f"{path}.values")),
        )
    return out


def _tag_rule(raw: Any, path: str, groups: Mapping[str, Group]) -> TagRule:
    entry = _mapping(raw, path, {"group", "issuer", "claim", "match", "values", "tags"})
    tags = tuple(_tags(entry.get("tags"), f"{path}.tags"))
    if "group" in entry:
        extra = sorted(k for k in entry if k not in ("group", "tags"))
        if extra:
            raise ConfigError(f"{path}: 'group' cannot be combined with {extra[0]!r}")
        return TagRule(tags=tags, group=_group_ref(entry["group"], f"{path}.group", groups))
    _require(entry, path, ("issuer", "claim"))
    if ("match" in entry) == ("values" in entry):
        raise ConfigError(f"{path}: give exactly one of 'match' (a glob) and 'values' (a list)")
    match = entry.get("match")
    if match is not None and (not isinstance(match, str) or not match):
        raise ConfigError(f"{path}.match: expected a non-empty glob string")
    values = _strings(entry["values"], f"{path}.values") if "values" in entry else []
    return TagRule(
        tags=tags,
        issuer=_issuer(entry["issuer"], f"{path}.issuer"),
        claim=_claim(entry["claim"], f"{path}.claim"),
        match=match,
        values=frozenset(values),
    )


def _acl(raw: Any, path: str, groups: Mapping[str, Group]) -> tuple[list[Rule], list[PodRule]]:
    """An acl's device rule (none when one side names only pods) and its pod rules; a
    pod rule also peers the pods' nodes with the other side (a rule with no ports)."""
    entry = _mapping(raw, path, {"src", "dst", "ports"})
    _require(entry, path, ("src", "dst"))
    ports: tuple[PortSpec, ...] | None = None
    if "ports" in entry:
        items = _list(entry["ports"], f"{path}.ports", empty=False)
        ports = tuple(_port(p, f"{path}.ports[{i}]") for i, p in enumerate(items))
    src, src_pods = _sides(entry["src"], f"{path}.src", groups)
    dst, dst_pods = _sides(entry["dst"], f"{path}.dst", groups)
    if src_pods and dst_pods:
        raise ConfigError(
            f"{path}: pods on both sides are not supported",
            hint="a pod rule is between pods and devices (tags, groups, '*')",
        )
    if (src_pods and not dst) or (dst_pods and not src):
        raise ConfigError(f"{path}: a pod rule needs devices (a tag, a group or '*') opposite")
    rules = [Rule(src=src, dst=dst, ports=ports)] if src and dst else []
    pods = [PodRule(s, dst, True, ports) for s in src_pods]
    pods += [PodRule(d, src, False, ports) for d in dst_pods]
    rules += [Rule(src=s.nodes, dst=dst, ports=()) for s in src_pods]
    rules += [Rule(src=src, dst=d.nodes, ports=()) for d in dst_pods]
    return rules, pods


def _route_rule(raw: Any, path: str, groups: Mapping[str, Group]) -> RouteRule:
    entry = _mapping(raw, path, {"tags", "allow"})
    _require(entry, path, ("tags", "allow"))
    items = _list(entry["allow"], f"{path}.allow", empty=False)
    return RouteRule(
        match=_entries(entry["tags"], f"{path}.tags", groups),
        allow=tuple(_prefix(p, f"{path}.allow[{i}]") for i, p in enumerate(items)),
    )


def _key_expiry(raw: Any) -> dict[str, float | None]:
    doc = _mapping(raw, "key_expiry", None)
    out: dict[str, float | None] = {}
    for key, value in doc.items():
        if key != "default" and not (isinstance(key, str) and _TAG.match(key)):
            raise ConfigError(f"key_expiry: {key!r} is neither 'default' nor a tag")
        out[key] = parse_duration(value, f"key_expiry.{key}")
    return out


def parse_duration(value: Any, path: str) -> float | None:
    """``"never"`` → None, ``"90d"`` → seconds (units s, m, h, d, w)."""
    if value == "never":
        return NEVER
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(
            f"{path}: {value!r} is not a duration", hint="'never' or a number and s|m|h|d|w: '180d'"
        )
    return float(int(match.group(1)) * _UNIT[match.group(2)])


# -- fields ---------------------------------------------------------------------


def _entries(raw: Any, path: str, groups: Mapping[str, Group]) -> frozenset[str]:
    items = _list(raw, path, empty=False)
    for i, item in enumerate(items):
        _entry(item, f"{path}[{i}]", groups)
    return frozenset(items)


def _entry(item: Any, where: str, groups: Mapping[str, Group]) -> None:
    if isinstance(item, str) and item.startswith(GROUP_PREFIX):
        _group_ref(item[len(GROUP_PREFIX) :], where, groups)
    elif not isinstance(item, str) or not (item == ANY or _TAG.match(item)):
        raise ConfigError(
            f"{where}: {item!r} is neither '*', a tag nor a group",
            hint="tags look like 'tag:db', groups like 'group:eng'",
        )


def _sides(
    raw: Any, path: str, groups: Mapping[str, Group]
) -> tuple[frozenset[str], list[PodSelector]]:
    """An acl side: its device entries and its pod selectors (``{pods: {...}}`` items)."""
    items = _list(raw, path, empty=False)
    names = [(i, item) for i, item in enumerate(items) if not isinstance(item, Mapping)]
    for i, item in names:
        _entry(item, f"{path}[{i}]", groups)
    pods = [
        _pod_selector(item, f"{path}[{i}]", groups)
        for i, item in enumerate(items)
        if isinstance(item, Mapping)
    ]
    return frozenset(item for _, item in names), pods


def _pod_selector(raw: Mapping[Any, Any], path: str, groups: Mapping[str, Group]) -> PodSelector:
    entry = _mapping(raw, path, {"pods", "nodes"})
    _require(entry, path, ("pods",))
    where = f"{path}.pods"
    match = _mapping(entry["pods"], where, {"namespace", "service_account", "labels"})
    if not match:
        raise ConfigError(f"{where}: give namespace, service_account or labels (at least one)")
    labels = _mapping(match.get("labels", {}), f"{where}.labels", None)
    for key, value in labels.items():
        if not _is_label(key, prefixed=True) or not _is_label(value, prefixed=False):
            raise ConfigError(f"{where}.labels: {key!r}: {value!r} is not a Kubernetes label")
    nodes = entry.get("nodes", [ANY])
    return PodSelector(
        namespace=_k8s_name(match.get("namespace"), f"{where}.namespace"),
        service_account=_k8s_name(match.get("service_account"), f"{where}.service_account"),
        labels=tuple(sorted(labels.items())),
        nodes=_entries(nodes, f"{path}.nodes", groups),
    )


def _k8s_name(raw: Any, path: str) -> str | None:
    if raw is not None and (not isinstance(raw, str) or not _K8S_NAME.match(raw)):
        raise ConfigError(f"{path}: {raw!r} is not a Kubernetes name")
    return raw


def _is_label(raw: Any, *, prefixed: bool) -> bool:
    if not isinstance(raw, str):
        return False
    prefix, _, name = raw.rpartition("/") if prefixed else ("", "", raw)
    if prefix and not _K8S_NAME.match(prefix):
        return False
    return bool(_LABEL.match(name)) and (bool(name) or not prefixed)


def _group_ref(name: Any, path: str, groups: Mapping[str, Group]) -> str:
    if not isinstance(name, str) or name not in groups:
        known = ", ".join(sorted(groups)) or "none defined"
        raise ConfigError(f'{path}: unknown group "{name}"', hint=f"groups: {known}")
    return name


def _tags(raw: Any, path: str) -> list[str]:
    items = _list(raw, path, empty=False)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not _TAG.match(item):
            raise ConfigError(f"{path}[{i}]: {item!r} is not a tag (tag:name)")
    return items


def _port(raw: Any, path: str) -> PortSpec:
    try:
        return parse_port(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _prefix(raw: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(raw, str):
        raise ConfigError(f"{path}: expected a CIDR prefix string")
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{path}: {raw!r} is not a CIDR prefix ({exc})") from None


def _issuer(raw: Any, path: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"{path}: expected the issuer URL as a string")
    try:
        check_url(raw, insecure_http=True, what=f"{path}:", error=ConfigError)
    except ValueError as exc:  # urlsplit: "Invalid IPv6 URL"
        raise ConfigError(f"{path}: {raw!r} is not a URL ({exc})") from None
    return raw


def _claim(raw: Any, path: str) -> str:
    if not isinstance(raw, str) or not _CLAIM.match(raw):
        raise ConfigError(f"{path}: expected a claim name")
    if raw in UNSAFE_CLAIMS:
        raise ConfigError(
            f"{path}: the claim {raw!r} is not verified data and cannot grant access",
            hint="use sub, email (only when email_verified), groups or another IdP-set claim",
        )
    return raw


def _strings(raw: Any, path: str) -> list[str]:
    items = _list(raw, path, empty=False)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{path}[{i}]: expected a non-empty string")
    return items


def _list(raw: Any, path: str, *, empty: bool) -> list[Any]:
    if not isinstance(raw, list) or (not raw and not empty):
        raise ConfigError(f"{path}: expected a {'' if empty else 'non-empty '}list")
    return raw


def _mapping(raw: Any, path: str, allowed: set[str] | None) -> Mapping[Any, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping")
    if allowed is not None:
        extra = sorted(str(k) for k in raw if k not in allowed)
        if extra:
            raise ConfigError(
                f"{path}: unknown field {extra[0]!r}", hint=f"allowed: {sorted(allowed)}"
            )
    return raw


def _require(entry: Mapping[Any, Any], path: str, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in entry:
            raise ConfigError(f"{path}: missing {name!r}")

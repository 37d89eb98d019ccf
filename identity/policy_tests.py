"""Tests a policy file carries about itself, and their runner (pure).

A policy file may end with a ``tests`` section (the form Tailscale's ACL tests use)::

    tests:
      - src: group:eng                       # a principal, or a list of them
        accept: ["tag:db:5432", "tag:db:icmp"]
        deny: ["tag:db:22", "tag:vm:*"]

``src`` is what a device carries (a tag, ``group:NAME``, or a list: a device
tagged ``tag:a`` and in group ``eng`` is ``[tag:a, group:eng]``). Each
``accept`` / ``deny`` entry is ``DST:PORT``: ``DST`` a tag or ``group:NAME``,
``PORT`` a number (a TCP port), a port spec of the ``acls`` (``tcp:5432``,
``udp:53``, ``tcp:8000-8099``, ``tcp``, ``udp``, ``icmp``) or ``*`` (everything).

``src`` may instead be one pod, ``{pod: {namespace, service_account, labels?}, node:
PRINCIPALS}``: a pod with exactly these, on a node carrying ``node``; it may open what
its node may open plus what the policy's pod rules give it (``docs/policy.md``).

An ``accept`` holds when a device with principals ``src`` may open every port
of ``PORT`` on a device with principals ``DST``; a ``deny`` holds when it may
open none of them (``*``: nothing at all). Opening needs peering, so a pair the
policy does not peer is denied everything. :func:`run_tests` returns one line
per failed expectation, each naming its test (``tests[1] (src group:eng):
tag:db:22 should be denied but is accepted``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from identity.policy import ANY, GROUP_PREFIX, Filter, Policy
from wiregate.errors import ConfigError
from wiregate.ports import PortSpec, canonical_ports, parse_port

__all__ = ["ALL_PORTS", "PodProbe", "PolicyTest", "Target", "parse_tests", "run_tests"]

ALL_PORTS = "*"
_TARGET = re.compile(r"^((?:tag|group):[A-Za-z0-9][A-Za-z0-9._-]{0,62}):(.+)$")
_NUMBER = re.compile(r"^[0-9]{1,5}$")
_MAX_PORT = 65535
CheckGroup = Callable[[str, str], None]  # (group name, path) -> raise if unknown


@dataclass(frozen=True, slots=True)
class Target:
    """``DST:PORT`` of a test: the destination's principal and the ports (None: ``*``)."""

    text: str
    dst: str
    port: PortSpec | None


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """One entry of ``tests``: what ``src`` must be able to open, and must not."""

    name: str
    src: frozenset[str]
    accept: tuple[Target, ...] = ()
    deny: tuple[Target, ...] = ()
    pod: PodProbe | None = None  # src is this pod, on a node with principals ``src``


@dataclass(frozen=True, slots=True)
class PodProbe:
    """The pod a test's ``src`` names: its namespace, service account and labels."""

    namespace: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()


def parse_tests(raw: Any, check_group: CheckGroup) -> tuple[PolicyTest, ...]:
    """The ``tests`` section; :class:`ConfigError` names the bad path (``tests[0].accept[1]``)."""
    if not isinstance(raw, list):
        raise ConfigError("tests: expected a list")
    return tuple(_test(entry, f"tests[{i}]", check_group) for i, entry in enumerate(raw))


def _test(raw: Any, path: str, check_group: CheckGroup) -> PolicyTest:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping with 'src' and 'accept' or 'deny'")
    extra = sorted(str(k) for k in raw if k not in ("src", "accept", "deny"))
    if extra:
        raise ConfigError(f"{path}: unknown field {extra[0]!r}",
                          hint="allowed: ['accept', 'deny', 'src']")  # fmt: skip
    if "src" not in raw:
        raise ConfigError(f"{path}: missing 'src'")
    if "accept" not in raw and "deny" not in raw:
        raise ConfigError(f"{path}: give 'accept', 'deny' or both")
    src, pod, where = raw["src"], None, f"{path}.src"
    if isinstance(src, Mapping):
        src, pod = _pod_source(src, where)
        where = f"{where}.node"
    principals = _principals(src, where, check_group)
    shown = ", ".join(sorted(principals))
    if pod is not None:
        shown = f"pod {pod.namespace}/{pod.service_account} on {shown}"
    return PolicyTest(
        name=f"{path} (src {shown})",
        src=principals,
        accept=_targets(raw.get("accept", []), f"{path}.accept", check_group),
        deny=_targets(raw.get("deny", []), f"{path}.deny", check_group),
        pod=pod,
    )


def _principals(src: Any, path: str, check_group: CheckGroup) -> frozenset[str]:
    """A principal or a non-empty list of them, at ``path``."""
    items = src if isinstance(src, list) else [src]
    if not items:
        raise ConfigError(f"{path}: expected a principal or a non-empty list of them")
    where = [f"{path}[{i}]" for i in range(len(items))] if isinstance(src, list) else [path]
    return frozenset(_principal(p, w, check_group) for p, w in zip(items, where, strict=True))


def _pod_source(raw: Mapping[Any, Any], path: str) -> tuple[Any, PodProbe]:
    """``{pod: {...}, node: ...}``: the node's principals (read as ``src`` is) and the pod."""
    if set(raw) != {"pod", "node"}:
        odd = sorted(str(k) for k in set(raw) ^ {"pod", "node"})[0]
        raise ConfigError(f"{path}.{odd}: " + ("unknown field" if odd in raw else "missing"))
    pod = raw["pod"]
    keys = {"namespace", "service_account", "labels"}
    if not isinstance(pod, Mapping) or not {"namespace", "service_account"} <= set(pod) <= keys:
        raise ConfigError(f"{path}.pod: expected namespace, service_account and labels (optional)")
    labels = pod.get("labels", {})
    texts = [pod["namespace"], pod["service_account"], *labels, *labels.values()] if isinstance(
        labels, Mapping) else [None]  # fmt: skip
    if not all(isinstance(t, str) and t for t in texts):
        raise ConfigError(f"{path}.pod: names and labels are non-empty strings")
    probe = PodProbe(pod["namespace"], pod["service_account"], tuple(sorted(labels.items())))
    return raw["node"], probe


def _principal(raw: Any, path: str, check_group: CheckGroup) -> str:
    match = _TARGET.match(f"{raw}:x") if isinstance(raw, str) else None
    if match is None or match.group(1) != raw:
        raise ConfigError(
            f"{path}: {raw!r} is neither a tag nor a group",
            hint="tags look like 'tag:web', groups like 'group:eng'",
        )
    principal: str = raw
    if principal.startswith(GROUP_PREFIX):
        check_group(principal[len(GROUP_PREFIX) :], path)
    return principal


def _targets(raw: Any, path: str, check_group: CheckGroup) -> tuple[Target, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a list of 'DST:PORT' entries")
    return tuple(_target(item, f"{path}[{i}]", check_group) for i, item in enumerate(raw))


def _target(raw: Any, path: str, check_group: CheckGroup) -> Target:
    match = _TARGET.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise ConfigError(
            f"{path}: {raw!r} is not DST:PORT",
            hint="'tag:db:5432', 'group:eng:udp:53', 'tag:db:icmp' or 'tag:db:*'",
        )
    dst, port = match.groups()
    _principal(dst, path, check_group)
    if port == ALL_PORTS:
        return Target(raw, dst, None)
    if _NUMBER.match(port):
        port = f"tcp:{port}"
    try:
        return Target(raw, dst, parse_port(port))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def run_tests(policy: Policy, tests: tuple[PolicyTest, ...]) -> list[str]:
    """One line per expectation of ``tests`` that ``policy`` does not meet (empty: all pass)."""
    failures: list[str] = []
    for test in tests:
        for target in test.accept:
            if not _opens_all(policy, test, target):
                failures.append(f"{test.name}: {target.text} should be accepted but is denied")
        for target in test.deny:
            if _opens_any(policy, test, target):
                failures.append(f"{test.name}: {target.text} should be denied but is accepted")
    return failures


_NOTHING = "nothing"  # not even peering


def _open(policy: Policy, test: PolicyTest, target: Target) -> Filter | str | None:
    """What the test's ``src`` may open on ``target.dst``: None everything, a filter, or
    :data:`_NOTHING` when the two do not peer (a pod: its node and the destination)."""
    src, dst = test.src, frozenset({target.dst})
    if not policy.may_peer(src, dst):
        return _NOTHING
    allowed = policy.reach(dst, src)
    pod = test.pod
    if pod is None or allowed is None:
        return allowed
    labels = dict(pod.labels)
    granted = [
        rule.opens()
        for rule in policy.pods
        if rule.outbound
        and rule.pods.matches(pod.namespace, pod.service_account, labels, src)
        and (ANY in rule.devices or not rule.devices.isdisjoint(dst))
    ]
    return canonical_ports(parse_port(s) for s in (*allowed, *(s for g in granted for s in g)))


def _opens_all(policy: Policy, test: PolicyTest, target: Target) -> bool:
    allowed = _open(policy, test, target)
    if allowed is None or isinstance(allowed, str):
        return allowed is None
    if target.port is None:
        return False
    return _covered(target.port, [parse_port(s) for s in allowed])


def _opens_any(policy: Policy, test: PolicyTest, target: Target) -> bool:
    allowed = _open(policy, test, target)
    if allowed is None or isinstance(allowed, str):
        return allowed is None
    if target.port is None:
        return bool(allowed)
    return any(_overlaps(target.port, parse_port(s)) for s in allowed)


def _span(spec: PortSpec) -> tuple[int, int]:
    return (1, _MAX_PORT) if spec.low is None else (spec.low, spec.high or spec.low)


def _overlaps(want: PortSpec, have: PortSpec) -> bool:
    if want.proto != have.proto:
        return False
    (a, b), (c, d) = _span(want), _span(have)
    return a <= d and c <= b


def _covered(want: PortSpec, have: list[PortSpec]) -> bool:
    """Whether the union of ``have`` holds every port of ``want``."""
    if want.proto == "icmp":
        return any(h.proto == "icmp" for h in have)
    low, high = _span(want)
    for start, end in sorted(_span(h) for h in have if h.proto == want.proto):
        if start > low:
            return False
        low = max(low, end + 1)
        if low > high:
            return True
    return False

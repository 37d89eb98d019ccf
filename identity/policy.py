"""Who may peer with whom, on which ports, and which routes are approved (pure).

A policy is a list of rules; each rule lets devices matching ``src`` reach
devices matching ``dst``, on ``ports`` (None: every port and protocol). An
entry is a tag (``tag:db``), a group (``group:eng``, a device whose owner was in
the group when it enrolled) or ``*`` (any device). A device is matched by its
*principals*: its tags plus ``group:NAME`` for each of its groups.

WireGuard peering is symmetric, so two devices are peers when a rule lets
either of them reach the other (:meth:`Policy.may_peer`); what each may open on
the other is not: :meth:`Policy.reach` is the inbound filter a device enforces
on a peer. ``routes`` (None: every advertised route is approved) says which
advertised prefixes a device may carry (:meth:`Policy.approve_routes`).

The legacy dict form (policy files written before groups and ports, TOML)::

    {"rules": [{"src": ["tag:web"], "dst": ["tag:db"]},
               {"src": ["*"], "dst": ["tag:dns"]}]}

The full policy file (groups, tag rules, ports, routes, key expiry) is read by
:mod:`identity.policy_file`. An empty rule list denies every pair;
:meth:`Policy.allow_all` peers everyone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from wiregate.errors import BadInput, WiregateError
from wiregate.ports import PortSpec, canonical_ports

__all__ = [
    "ALL_PROTOCOLS",
    "ANY",
    "GROUP_PREFIX",
    "Filter",
    "PodRule",
    "PodSelector",
    "Policy",
    "RouteRule",
    "Rule",
    "principals",
]

ANY = "*"
GROUP_PREFIX = "group:"
_TAG = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CACHE_LIMIT = 65536

TagSet = frozenset[str]
Filter = tuple[str, ...]  # canonical port specs a peer may open; () = nothing
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def principals(tags: Collection[str], groups: Collection[str] = ()) -> TagSet:
    """What policy entries match a device: its tags and ``group:NAME`` per group."""
    if not groups:
        return frozenset(tags)
    return frozenset(tags).union(GROUP_PREFIX + g for g in groups)


@dataclass(frozen=True, slots=True)
class Rule:
    """Devices matching ``src`` may reach devices matching ``dst`` on ``ports``.

    ``ports`` None means every port and protocol.
    """

    src: frozenset[str]
    dst: frozenset[str]
    ports: tuple[PortSpec, ...] | None = None

    def allows(self, tags_from: TagSet, tags_to: TagSet) -> bool:
        """Whether this rule lets a device tagged ``tags_from`` reach one tagged ``tags_to``."""
        return _matches(self.src, tags_from) and _matches(self.dst, tags_to)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Devices matching ``match`` may advertise routes inside the ``allow`` prefixes."""

    match: frozenset[str]
    allow: tuple[Network, ...]

    def approves(self, who: TagSet, route: Network) -> bool:
        """Whether ``route`` of a device with principals ``who`` lies inside an allowed prefix."""
        return _matches(self.match, who) and any(
            route.version == net.version and route.subnet_of(net)  # type: ignore[arg-type]
            for net in self.allow
        )


@dataclass(frozen=True, slots=True)
class PodSelector:
    """Pods by what their node reports: every field given must match (None: any).

    ``labels`` must all be present with these values; ``nodes`` are the principals
    (``*``, tags, groups) of the nodes whose pods count.
    """

    namespace: str | None = None
    service_account: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    nodes: frozenset[str] = frozenset({ANY})

    def matches(
        self, namespace: str, account: str, labels: Mapping[str, str], node: TagSet
    ) -> bool:
        """Whether a pod of ``namespace`` / ``account`` with ``labels``, on a node with
        principals ``node``, is selected."""
        return (
            (self.namespace is None or self.namespace == namespace)
            and (self.service_account is None or self.service_account == account)
            and all(labels.get(k) == v for k, v in self.labels)
            and _matches(self.nodes, node)
        )


@dataclass(frozen=True, slots=True)
class PodRule:
    """Pods matching ``pods`` may open ``ports`` on devices matching ``devices``
    (``outbound``), or devices matching ``devices`` may open ``ports`` on those pods.

    ``ports`` None means every protocol (``tcp``, ``udp``, ``icmp``). The pod's node and
    the devices peer (a plain :class:`Rule` with no ports, added by the policy file).
    """

    pods: PodSelector
    devices: frozenset[str]
    outbound: bool
    ports: tuple[PortSpec, ...] | None = None

    def opens(self) -> Filter:
        """The filter this rule grants, canonical."""
        if self.ports is None:
            return ALL_PROTOCOLS
        return canonical_ports(self.ports)


ALL_PROTOCOLS: Filter = canonical_ports([PortSpec("tcp"), PortSpec("udp"), PortSpec("icmp")])


def _matches(entries: frozenset[str], tags: TagSet) -> bool:
    return ANY in entries or not entries.isdisjoint(tags)


@dataclass(frozen=True, slots=True)
class Policy:
    """Ordered :class:`Rule` s and optional :class:`RouteRule` s; answers are memoized.

    ``pods`` are the rules naming pods (:class:`PodRule`, ``docs/policy.md``).
    ``directional`` (the policy file's ACLs) makes :meth:`reach` enforce each
    rule's direction and ports; without it (the legacy rules) peers reach each
    other on everything.
    """

    rules: tuple[Rule, ...]
    routes: tuple[RouteRule, ...] | None = None
    directional: bool = False
    pods: tuple[PodRule, ...] = ()  # pod selectors as sources and destinations
    _cache: dict[tuple[TagSet, TagSet], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _reach: dict[tuple[TagSet, TagSet], Filter | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _approved: dict[tuple[TagSet, tuple[str, ...]], tuple[Filter, Filter]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def allow_all(cls) -> Policy:
        """Every device may peer with every other device."""
        return cls(rules=(Rule(src=frozenset({ANY}), dst=frozenset({ANY})),))

    @classmethod
    def from_dict(cls, data: Any, *, error: type[WiregateError] = BadInput) -> Policy:
        """Build a policy from its legacy dict form, or raise ``error`` naming the bad field.

        Pass ``error=ConfigError`` when the dict comes from the gateway's own
        configuration, keep the default :class:`BadInput` for API input.
        """
        if not isinstance(data, Mapping):
            raise error("policy: expected an object with a 'rules' list")
        _no_extra_keys(data, {"rules"}, "policy", error)
        rules = data.get("rules")
        if not isinstance(rules, list):
            raise error("policy.rules: expected a list of rules")
        return cls(
            rules=tuple(_parse_rule(r, f"policy.rules[{i}]", error) for i, r in enumerate(rules))
        )

    def may_peer(self, tags_a: Collection[str], tags_b: Collection[str]) -> bool:
        """Whether devices with principals ``tags_a`` and ``tags_b`` peer (symmetric, memoized)."""
        a, b = frozenset(tags_a), frozenset(tags_b)
        key = (a, b)
        hit = self._cache.get(key)
        if hit is None:
            hit = any(r.allows(a, b) or r.allows(b, a) for r in self.rules)
            _bounded(self._cache)
            self._cache[key] = hit
            self._cache[(b, a)] = hit
        return hit

    def reach(self, viewer: TagSet, peer: TagSet) -> Filter | None:
        """What a device ``peer`` may open on a device ``viewer``: None = everything.

        ``()`` means nothing (the two peer only because ``viewer`` may reach
        ``peer``; replies to ``viewer``'s own connections still pass).
        """
        if not self.directional:
            return None
        key = (viewer, peer)
        if key in self._reach:
            return self._reach[key]
        specs: list[PortSpec] = []
        result: Filter | None = ()
        for rule in self.rules:
            if rule.allows(peer, viewer):
                if rule.ports is None:
                    result = None
                    break
                specs.extend(rule.ports)
        if result is not None:
            result = canonical_ports(specs)
        _bounded(self._reach)
        self._reach[key] = result
        return result

    def approve_routes(self, who: TagSet, routes: tuple[str, ...]) -> tuple[Filter, Filter]:
        """``(approved, refused)``: which of a device's advertised ``routes`` its peers get."""
        if self.routes is None or not routes:
            return routes, ()
        key = (who, routes)
        hit = self._approved.get(key)
        if hit is None:
            approved = tuple(r for r in routes if self._approves(who, r))
            refused = tuple(r for r in routes if r not in approved)
            hit = (approved, refused)
            _bounded(self._approved)
            self._approved[key] = hit
        return hit

    def _approves(self, who: TagSet, route: str) -> bool:
        try:
            net = ipaddress.ip_network(route, strict=True)
        except ValueError:
            return False
        return any(rule.approves(who, net) for rule in self.routes or ())


def _bounded(cache: dict[Any, Any]) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()


def _parse_rule(raw: Any, path: str, error: type[WiregateError]) -> Rule:
    if not isinstance(raw, Mapping):
        raise error(f"{path}: expected an object with 'src' and 'dst'")
    _no_extra_keys(raw, {"src", "dst"}, path, error)
    return Rule(
        src=_parse_entries(raw.get("src"), f"{path}.src", error),
        dst=_parse_entries(raw.get("dst"), f"{path}.dst", error),
    )


def _parse_entries(raw: Any, path: str, error: type[WiregateError]) -> frozenset[str]:
    if not isinstance(raw, list) or not raw:
        raise error(f"{path}: expected a non-empty list of tags or '*'")
    for i, entry in enumerate(raw):
        if not isinstance(entry, str) or not (entry == ANY or _TAG.match(entry)):
            raise error(
                f"{path}[{i}]: {entry!r} is neither '*' nor a tag",
                hint="tags look like 'tag:db' (letters, digits, '.', '_', '-')",
            )
    return frozenset(raw)


def _no_extra_keys(
    data: Mapping[Any, Any], allowed: set[str], path: str, error: type[WiregateError]
) -> None:
    extra = sorted(str(k) for k in data if k not in allowed)
    if extra:
        raise error(f"{path}: unknown field {extra[0]!r}", hint=f"allowed: {sorted(allowed)}")

"""Who may peer with whom: a small tag ACL (pure).

A policy is a list of rules; each rule lets devices matching ``src`` reach
devices matching ``dst``. An entry is a tag (``tag:db``) or ``*`` (any device,
tagged or not). WireGuard peering is symmetric, so two devices are peers when a
rule lets either of them reach the other.

The dict form (from a config file or the admin API)::

    {"rules": [{"src": ["tag:web"], "dst": ["tag:db"]},
               {"src": ["*"], "dst": ["tag:dns"]}]}

An empty rule list denies every pair; :meth:`Policy.allow_all` peers everyone.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import BadInput, WiregateError

__all__ = ["ANY", "Policy", "Rule"]

ANY = "*"
_TAG = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CACHE_LIMIT = 65536

TagSet = frozenset[str]


@dataclass(frozen=True, slots=True)
class Rule:
    """Devices matching ``src`` may reach devices matching ``dst``."""

    src: frozenset[str]
    dst: frozenset[str]

    def allows(self, tags_from: TagSet, tags_to: TagSet) -> bool:
        """Whether this rule lets a device tagged ``tags_from`` reach one tagged ``tags_to``."""
        return _matches(self.src, tags_from) and _matches(self.dst, tags_to)


def _matches(entries: frozenset[str], tags: TagSet) -> bool:
    return ANY in entries or not entries.isdisjoint(tags)


@dataclass(frozen=True, slots=True)
class Policy:
    """An ordered tuple of :class:`Rule`; answers :meth:`may_peer` (memoized)."""

    rules: tuple[Rule, ...]
    _cache: dict[tuple[TagSet, TagSet], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def allow_all(cls) -> Policy:
        """Every device may peer with every other device."""
        return cls(rules=(Rule(src=frozenset({ANY}), dst=frozenset({ANY})),))

    @classmethod
    def from_dict(cls, data: Any, *, error: type[WiregateError] = BadInput) -> Policy:
        """Build a policy from its dict form, or raise ``error`` naming the bad field.

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

    def to_dict(self) -> dict[str, Any]:
        """The dict form accepted by :meth:`from_dict`."""
        return {"rules": [{"src": sorted(r.src), "dst": sorted(r.dst)} for r in self.rules]}

    def may_peer(self, tags_a: Collection[str], tags_b: Collection[str]) -> bool:
        """Whether devices tagged ``tags_a`` and ``tags_b`` peer (symmetric, memoized)."""
        a, b = frozenset(tags_a), frozenset(tags_b)
        key = (a, b)
        hit = self._cache.get(key)
        if hit is None:
            hit = any(r.allows(a, b) or r.allows(b, a) for r in self.rules)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = hit
            self._cache[(b, a)] = hit
        return hit


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

"""What a device is granted at enrollment, from its owner's verified claims (pure).

An OIDC login, a workload token or a Kubernetes ServiceAccount token all end
as verified :class:`~identity.claims.Claims`. :func:`enrollment_grant` matches
them against a :class:`~identity.policy_file.PolicyFile`: the groups whose
issuer and claim match, then the tags of every matching tag rule. Only
verified data is read: the token's issuer and subject, ``email`` only when
``email_verified`` is true, other claims as the (signature-checked) token
carries them; claims that users can set themselves are refused when the
policy is loaded.

The grant is stored with the device (:func:`stored_tags`: its tags, then
``group:NAME`` per group, in the device's tag column) so that the map is
evaluated from tags and group names alone, without claims at evaluation time.
A policy change to a group's definition applies to devices enrolled after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from identity.claims import Claims, verified_email
from identity.policy import GROUP_PREFIX
from identity.policy_file import PolicyFile, TagRule

__all__ = [
    "Grant",
    "claim_values",
    "enrollment_grant",
    "key_lifetime",
    "split_stored_tags",
    "stored_tags",
]


@dataclass(frozen=True, slots=True)
class Grant:
    """Tags and group names granted to a device at enrollment (sorted, distinct)."""

    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


def claim_values(claims: Claims, claim: str) -> tuple[str, ...]:
    """The verified string values of ``claim`` (a string or a list of strings)."""
    if claim == "sub":
        return (claims.subject,)
    if claim == "iss":
        return (claims.issuer,)
    if claim == "email":
        email = verified_email(claims)
        return () if email is None else (email,)
    raw = claims.raw.get(claim)
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list):
        return tuple(v for v in raw if isinstance(v, str))
    return ()


def enrollment_grant(policy: PolicyFile, claims: Claims, extra_tags: Iterable[str] = ()) -> Grant:
    """The groups and tags ``claims`` earn under ``policy``, plus ``extra_tags``."""
    groups = sorted(
        g.name
        for g in policy.groups.values()
        if g.issuer == claims.issuer and not g.values.isdisjoint(claim_values(claims, g.claim))
    )
    tags = set(extra_tags)
    for rule in policy.tag_rules:
        if _rule_matches(rule, claims, groups):
            tags.update(rule.tags)
    return Grant(tags=tuple(sorted(tags)), groups=tuple(groups))


def _rule_matches(rule: TagRule, claims: Claims, groups: list[str]) -> bool:
    if rule.group is not None:
        return rule.group in groups
    if rule.issuer != claims.issuer or rule.claim is None:
        return False
    values = claim_values(claims, rule.claim)
    if rule.match is not None:
        return any(fnmatchcase(v, rule.match) for v in values)
    return not rule.values.isdisjoint(values)


def key_lifetime(policy: PolicyFile, tags: Iterable[str]) -> float | None:
    """Seconds a device key with ``tags`` lives (None: never, or no ``key_expiry``).

    A tag entry overrides ``default``; with several tag entries the shortest wins.
    """
    expiry = policy.key_expiry
    own = [expiry[t] for t in tags if t in expiry]
    if not own:
        return expiry.get("default")
    finite = [v for v in own if v is not None]
    return min(finite) if finite else None


def stored_tags(grant: Grant) -> tuple[str, ...]:
    """The tag column of a device: its tags, then ``group:NAME`` for each group."""
    return grant.tags + tuple(GROUP_PREFIX + g for g in grant.groups)


def split_stored_tags(column: Iterable[str]) -> Grant:
    """Inverse of :func:`stored_tags` (order kept)."""
    items = list(column)
    tags = tuple(t for t in items if not t.startswith(GROUP_PREFIX))
    groups = tuple(t[len(GROUP_PREFIX) :] for t in items if t.startswith(GROUP_PREFIX))
    return Grant(tags=tags, groups=groups)

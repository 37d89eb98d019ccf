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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from identity.claims import Claims, verified_email
from identity.policy import GROUP_PREFIX
from identity.policy_file import PolicyFile, TagRule
from wiregate.model import Identity

__all__ = [
    "Grant",
    "claim_values",
    "enrollment_grant",
    "grant_for",
    "key_lifetime",
    "lifetime_rule",
    "stored_tags",
]


@dataclass(frozen=True, slots=True)
class Grant:
    """Tags and group names granted to a device at enrollment (sorted, distinct)."""

    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


Verified = Mapping[str, str | Sequence[str]]  # claim name -> verified value(s)


def claim_values(claims: Claims, claim: str) -> tuple[str, ...]:
    """The verified string values of ``claim`` (a string or a list of strings)."""
    if claim == "sub":
        return (claims.subject,)
    if claim == "iss":
        return (claims.issuer,)
    if claim == "email":
        email = verified_email(claims)
        return () if email is None else (email,)
    return _strings(claims.raw.get(claim))


def _strings(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list | tuple):
        return tuple(v for v in raw if isinstance(v, str))
    return ()


def enrollment_grant(policy: PolicyFile, claims: Claims, extra_tags: Iterable[str] = ()) -> Grant:
    """The groups and tags ``claims`` earn under ``policy``, plus ``extra_tags``."""
    names = {g.claim for g in policy.groups.values()} | {r.claim for r in policy.tag_rules}
    verified = {n: claim_values(claims, n) for n in names if n is not None}
    return grant_for(policy, claims.issuer, verified, extra_tags)


def grant_for(
    policy: PolicyFile, issuer: str, verified: Verified, extra_tags: Iterable[str] = ()
) -> Grant:
    """:func:`enrollment_grant` from already verified claim values of a token of ``issuer``.

    For callers that keep a verified subset of a token (a web session: its
    ``sub``, ``email`` only if verified, its groups); the caller answers for
    ``verified`` holding nothing a user could set.
    """
    groups = sorted(
        g.name
        for g in policy.groups.values()
        if g.issuer == issuer and not g.values.isdisjoint(_strings(verified.get(g.claim)))
    )
    tags = set(extra_tags)
    for rule in policy.tag_rules:
        if _rule_matches(rule, issuer, verified, groups):
            tags.update(rule.tags)
    return Grant(tags=tuple(sorted(tags)), groups=tuple(groups))


def _rule_matches(rule: TagRule, issuer: str, verified: Verified, groups: list[str]) -> bool:
    if rule.group is not None:
        return rule.group in groups
    if rule.issuer != issuer or rule.claim is None:
        return False
    values = _strings(verified.get(rule.claim))
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


def lifetime_rule(policy: PolicyFile) -> Callable[[Identity, Sequence[str]], float | None]:
    """:func:`key_lifetime` as the store's key-lifetime rule (``Store.set_key_lifetime``)."""

    def lifetime(_identity: Identity, tags: Sequence[str]) -> float | None:
        return key_lifetime(policy, tags)

    return lifetime


def stored_tags(grant: Grant) -> tuple[str, ...]:
    """The tag column of a device: its tags, then ``group:NAME`` for each group."""
    return grant.tags + tuple(GROUP_PREFIX + g for g in grant.groups)

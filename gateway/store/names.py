"""Device names: each one a DNS label, unique among the devices (mesh DNS names them).

A name an administrator sets must already be a label (:func:`check_label`); a name
a device asks for at enrollment is made one (:func:`to_label`: lowercased, every
other character a hyphen, at most 63 characters) and, when another device has it,
given the first free suffix ``-2``, ``-3`` … (:func:`free_name`), as Tailscale does.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.models import DeviceRow
from wiregate.errors import BadInput, Conflict

__all__ = [
    "LABEL_PATTERN",
    "MAX_LABEL",
    "NameTaken",
    "check_label",
    "free_name",
    "given_for",
    "next_free",
    "refuse_taken",
    "to_label",
]

MAX_LABEL = 63
LABEL_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_LABEL = re.compile(LABEL_PATTERN)
_NOT_LABEL = re.compile(r"[^a-z0-9-]")
FALLBACK = "device"


class NameTaken(Conflict):
    """Another device has this name."""

    code = "name_taken"


def check_label(name: str) -> str:
    """``name`` if it is a DNS label (lowercase letters, digits, inner hyphens, 1 to 63)."""
    if not _LABEL.fullmatch(name):
        raise BadInput(
            f"{name[:80]!r} is not a device name",
            code="invalid_name",
            hint="1 to 63 lowercase letters, digits or '-', not starting or ending with '-'",
        )
    return name


def to_label(requested: str) -> str:
    """The DNS label made of a requested name: ``Web_01.prod`` → ``web-01-prod``."""
    label = _NOT_LABEL.sub("-", requested.lower())[:MAX_LABEL].strip("-")
    return label or FALLBACK


def given_for(name: str, label: str) -> bool:
    """Whether ``name`` is what a device asking for ``label`` was given: ``label`` itself
    or ``label-N``."""
    return name == label or (name.startswith(label + "-") and name[len(label) + 1 :].isdigit())


def next_free(base: str, taken: set[str]) -> str:
    """``base`` if not in ``taken``, else ``base-N`` for the smallest free N ≥ 2 (the
    base shortened so that the name stays a label)."""
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        name = base[: MAX_LABEL - len(suffix)].rstrip("-") + suffix
        if name not in taken:
            return name
        n += 1


async def free_name(s: AsyncSession, base: str, *, exclude: str | None = None) -> str:
    """:func:`next_free` against the devices in the store (``exclude``: a device id not
    counted, the one being renamed). Callers hold the map's write lock (they bumped the
    version first), so no other transaction takes the name meanwhile."""
    taken: set[str] = set()
    while await _taken(s, name := next_free(base, taken), exclude):
        if not taken:  # the base is taken: read every name sharing its start at once
            query = select(DeviceRow.name).where(DeviceRow.name.like(base[:40] + "%"))
            if exclude is not None:
                query = query.where(DeviceRow.id != exclude)
            taken.update((await s.execute(query)).scalars())
        taken.add(name)
    return name


async def refuse_taken(s: AsyncSession, name: str, device_id: str) -> None:
    """:class:`NameTaken` (409) if a device other than ``device_id`` is called ``name``."""
    if await _taken(s, name, device_id):
        raise NameTaken(
            f"another device is already called {name!r}",
            hint="device names are unique: choose another, or rename that device first",
        )


async def _taken(s: AsyncSession, name: str, exclude: str | None) -> bool:
    query = select(DeviceRow.id).where(DeviceRow.name == name)
    if exclude is not None:
        query = query.where(DeviceRow.id != exclude)
    return (await s.execute(query.limit(1))).first() is not None

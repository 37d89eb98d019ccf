"""The revocation document: devices the gateway removed lately, for relays (sans-IO codec).

The gateway serves it at ``GET /api/v1/relay/revocations``, next to the signers
document; :mod:`relay.aio.signers` polls it. A device deleted, disabled (its
identity) or expired is listed for :data:`WINDOW` seconds after its removal:
longer than any ticket naming it can be used (:data:`relay.tickets.MAX_LIFETIME`
plus clock skew), so a relay that applies the list refuses every such ticket
issued before the removal and releases every allocation the device is in::

    {"revoked": [{"tenant": "default", "device_id": "dev_…", "revoked_at": 1733462796.25}],
     "window": 360}

Fields this version does not know are ignored, at the top and in each entry, so a
newer gateway may add some; an entry missing a field, or of the wrong type, makes
the whole document refused (the relay keeps the list it had).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from relay.tickets import MAX_LIFETIME, MAX_TEXT

__all__ = ["WINDOW", "Revoked", "build_revocations", "parse_revocations", "revocations_document"]

#: Seconds a removed device stays listed: a ticket's longest life and a margin for the
#: clocks of the gateway and the relays (tickets are refused past expiry + a 5 s skew).
WINDOW = MAX_LIFETIME + 60

#: ``(tenant, device id)`` -> when the gateway removed it (unix seconds).
Revoked = dict[tuple[str, str], float]


def build_revocations(entries: Iterable[tuple[str, str, float]]) -> dict[str, Any]:
    """The document for ``(tenant, device id, revoked_at)`` entries (sorted: a stable ETag)."""
    rows = sorted(entries, key=lambda e: (e[2], e[0], e[1]))
    return {
        "revoked": [{"tenant": t, "device_id": d, "revoked_at": at} for t, d, at in rows],
        "window": WINDOW,
    }


def revocations_document(text: bytes | str) -> Revoked:
    """A revocation document's body to :data:`Revoked`; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"not JSON: {exc}") from None
    return parse_revocations(data)


def parse_revocations(data: Any) -> Revoked:
    """``{"revoked": [...]}`` to :data:`Revoked` (a device listed twice: its latest time)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("revoked"), list):
        raise ValueError('the document must be an object with a "revoked" list')
    revoked: Revoked = {}
    for i, item in enumerate(data["revoked"]):
        key, at = _entry(item, f"revoked[{i}]")
        revoked[key] = max(at, revoked.get(key, at))
    return revoked


def _entry(item: Any, where: str) -> tuple[tuple[str, str], float]:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be an object")
    names = []
    for field in ("tenant", "device_id"):
        value = item.get(field)
        if not isinstance(value, str) or not 1 <= len(value.encode()) <= MAX_TEXT:
            raise ValueError(f"{where}.{field} must be 1..{MAX_TEXT} bytes of text")
        names.append(value)
    at = item.get("revoked_at")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ValueError(f"{where}.revoked_at must be a number of unix seconds")
    return (names[0], names[1]), float(at)

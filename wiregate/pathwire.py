"""The ``paths`` message: an agent's report of its path to each peer (pure codec).

An agent sends, on its map stream, next to ``endpoints`` (:mod:`wiregate.mapwire`)::

    {"type": "paths", "paths": [
      {"peer": "dev_0123456789abcdef", "path_mtu": 1360, "black_hole": false,
       "frag_needed": 1, "probe_failures": 3, "path": "direct", "relay": null,
       "reason": "handshake on the direct endpoint", "handshake_age": 12.5,
       "rtt_ms": 0.8}, ...]}

Each entry is one peer, by device id: ``path_mtu`` the largest inner packet the last
probe saw pass (null: not probed yet, or no probe passed), ``black_hole`` whether that
probe met a size lost without ICMP while smaller ones passed, ``frag_needed`` and
``probe_failures`` counts since the agent started (searches that met "fragmentation
needed", probes lost), ``path`` the path machine's kind (:data:`PATH_KINDS`), ``relay``
the relay id while relayed, ``reason`` its explanation, ``handshake_age`` seconds since
WireGuard's latest handshake (null: none), ``rtt_ms`` the fastest probe round trip
(null: none measured). A message carries at most :data:`MAX_PATH_ENTRIES` peers; an
agent with more sends several. Every field is required, and nothing else is read:
unknown fields, duplicate peers, values out of :data:`LIMITS` are refused with a
:class:`PathReportError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from wiregate import strictjson
from wiregate.errors import BadInput
from wiregate.strictjson import StrictJSONError

__all__ = [
    "LIMITS",
    "MAX_PATH_ENTRIES",
    "MAX_REASON",
    "PATH_KINDS",
    "PathEntry",
    "PathReportError",
    "PathsReport",
    "build_paths",
    "entry_json",
    "parse_paths",
    "read_paths",
]

MAX_PATH_ENTRIES: Final = 256
MAX_REASON: Final = 200
PATH_KINDS: Final = frozenset({"direct", "relayed", "probing", "failed"})
#: inclusive numeric ranges of the entry's fields
LIMITS: Final[Mapping[str, tuple[float, float]]] = {
    "path_mtu": (68, 65535),
    "frag_needed": (0, 2**31 - 1),
    "probe_failures": (0, 2**31 - 1),
    "handshake_age": (0, 10 * 365 * 86400.0),
    "rtt_ms": (0, 600_000.0),
}
_FIELDS: Final = frozenset(
    {"peer", "path_mtu", "black_hole", "frag_needed", "probe_failures", "path", "relay",
     "reason", "handshake_age", "rtt_ms"}
)  # fmt: skip
_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_RELAY_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class PathReportError(BadInput):
    """A ``paths`` message that does not follow its format (nothing of it is kept)."""

    code = "bad_path_report"


@dataclass(frozen=True, slots=True)
class PathEntry:
    """What one agent reports of its path to one peer (see the module docstring)."""

    peer: str
    path_mtu: int | None
    black_hole: bool
    frag_needed: int
    probe_failures: int
    path: str
    relay: str | None
    reason: str
    handshake_age: float | None
    rtt_ms: float | None


@dataclass(frozen=True, slots=True)
class PathsReport:
    """An agent's ``paths`` message: its entries, one per peer."""

    entries: tuple[PathEntry, ...]


def entry_json(entry: PathEntry) -> dict[str, Any]:
    """One entry's JSON form."""
    return {
        "peer": entry.peer,
        "path_mtu": entry.path_mtu,
        "black_hole": entry.black_hole,
        "frag_needed": entry.frag_needed,
        "probe_failures": entry.probe_failures,
        "path": entry.path,
        "relay": entry.relay,
        "reason": entry.reason,
        "handshake_age": entry.handshake_age,
        "rtt_ms": entry.rtt_ms,
    }


def build_paths(entries: Iterable[PathEntry]) -> dict[str, Any]:
    """The ``paths`` message of ``entries`` (at most :data:`MAX_PATH_ENTRIES`)."""
    listed = [entry_json(e) for e in entries]
    if len(listed) > MAX_PATH_ENTRIES:
        raise ValueError(f"at most {MAX_PATH_ENTRIES} entries per message")
    return {"type": "paths", "paths": listed}


def parse_paths(text: str | bytes) -> PathsReport:
    """A ``paths`` message's text as a :class:`PathsReport`: as :func:`read_paths`, and
    a key repeated in an object, or ``NaN``/``Infinity``, is refused too."""
    try:
        doc = strictjson.loads(text)
    except StrictJSONError as exc:
        raise PathReportError(f"message is not strict JSON: {exc}") from None
    return read_paths(doc)


def read_paths(doc: object) -> PathsReport:
    """A decoded ``paths`` message as a :class:`PathsReport`, or :class:`PathReportError`."""
    if not isinstance(doc, dict) or doc.get("type") != "paths":
        raise PathReportError("expected a message of type 'paths'")
    if set(doc) != {"type", "paths"}:
        raise PathReportError(f"unknown fields: {_names(set(doc) - {'type', 'paths'})}")
    items = doc["paths"]
    if not isinstance(items, list) or len(items) > MAX_PATH_ENTRIES:
        raise PathReportError(f"paths: expected a list of at most {MAX_PATH_ENTRIES} entries")
    entries = tuple(_entry(item, i) for i, item in enumerate(items))
    peers = [e.peer for e in entries]
    if len(set(peers)) != len(peers):
        raise PathReportError("paths: a peer is listed twice")
    return PathsReport(entries)


def _entry(item: object, index: int) -> PathEntry:
    where = f"paths[{index}]"
    if not isinstance(item, dict):
        raise PathReportError(f"{where}: expected an object")
    if set(item) != _FIELDS:
        unknown, missing = set(item) - _FIELDS, _FIELDS - set(item)
        what = f"unknown fields: {_names(unknown)}" if unknown else f"missing: {_names(missing)}"
        raise PathReportError(f"{where}: {what}")
    return PathEntry(
        peer=_matching(item["peer"], _ID, f"{where}.peer", "a device id"),
        path_mtu=_optional_count(item["path_mtu"], f"{where}.path_mtu", "path_mtu"),
        black_hole=_bool(item["black_hole"], f"{where}.black_hole"),
        frag_needed=_count(item["frag_needed"], f"{where}.frag_needed", "frag_needed"),
        probe_failures=_count(item["probe_failures"], f"{where}.probe_failures", "probe_failures"),
        path=_kind(item["path"], f"{where}.path"),
        relay=_relay(item["relay"], f"{where}.relay"),
        reason=_reason(item["reason"], f"{where}.reason"),
        handshake_age=_number(item["handshake_age"], f"{where}.handshake_age", "handshake_age"),
        rtt_ms=_number(item["rtt_ms"], f"{where}.rtt_ms", "rtt_ms"),
    )


def _names(keys: Iterable[object]) -> str:
    return ", ".join(sorted(json.dumps(k)[:40] for k in keys))


def _count(value: object, where: str, field: str) -> int:
    low, high = LIMITS[field]
    if type(value) is not int or not low <= value <= high:
        raise PathReportError(f"{where}: expected an integer from {low:g} to {high:g}")
    return value


def _optional_count(value: object, where: str, field: str) -> int | None:
    return None if value is None else _count(value, where, field)


def _number(value: object, where: str, field: str) -> float | None:
    if value is None:
        return None
    low, high = LIMITS[field]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PathReportError(f"{where}: expected null or a number from {low:g} to {high:g}")
    if not math.isfinite(value) or not low <= value <= high:
        raise PathReportError(f"{where}: expected null or a number from {low:g} to {high:g}")
    return float(value)


def _bool(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise PathReportError(f"{where}: expected true or false")
    return value


def _matching(value: object, pattern: re.Pattern[str], where: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise PathReportError(f"{where}: expected {what}")
    return value


def _kind(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in PATH_KINDS:
        raise PathReportError(f"{where}: expected one of {', '.join(sorted(PATH_KINDS))}")
    return value


def _relay(value: object, where: str) -> str | None:
    return None if value is None else _matching(value, _RELAY_ID, where, "null or a relay id")


def _reason(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_REASON or not value.isprintable():
        raise PathReportError(f"{where}: expected printable text, at most {MAX_REASON} long")
    return value

"""What a benchmark run writes, and the bands a quick run must stay within (pure).

``benchmarks/results.json`` holds the figures flat (name -> number, what
``check-figures.sh`` reads), ``NAME_skipped`` (a reason, never a figure) for a
benchmark that could not run or failed, and where every figure came from::

    "run":      {"commit": SHA, "dirty": bool, "date": ISO-8601, "benchmarks": [...],
                 "complete": bool}                       # the run that wrote the file
    "measured": {NAME: {"commit", "dirty", "date", "figures": [...]} | {..., "skipped"}}

A full run starts from nothing: every figure is from this run. A partial run
(named benchmarks) replaces the figures of the benchmarks it ran, keeps the
others with their own commit and date, and says so (``complete`` is false).
Figures of a file without provenance are attributed to a run ``"unknown"``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["BANDS", "Provenance", "check_bands", "merge"]

Provenance = dict[str, Any]  # {"commit": str, "dirty": bool, "date": str}
Figures = Mapping[str, float | str]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}

# Same-run ratios a quick run must keep (generous: a shared CI machine measures them).
# NAME: (op, bound, why)
BANDS: dict[str, tuple[str, float, str]] = {
    "reconcile_single_frac": ("<=", 0.10, "a one-peer change costs <= 10 % of a full apply"),
    "reconcile_ratio": ("<=", 3.0, "a full apply costs <= 3x wg setconf of the same config"),
    "reconcile_noop_writes": ("==", 0.0, "an unchanged map writes nothing"),
    "netmap_slope": ("<=", 1.5, "a change's cost grows with the peers it affects, not more"),
    "enroll_vs_bare_insert": ("<=", 25.0, "an enrollment costs <= 25 bare durable commits"),
}

_META = ("run", "measured", "commit", "dirty", "date")


def merge(
    previous: Mapping[str, Any] | None,
    measured: Mapping[str, Figures],
    run: Provenance,
    every: Iterable[str],
) -> dict[str, Any]:
    """The results document after a run that measured ``measured`` (benchmark -> figures).

    ``previous``: the file before, or None for a full run; ``every``: all benchmark names.
    """
    every = list(every)
    doc: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    if previous is not None:
        doc, sources = _previous(previous, every)
    for name, figures in measured.items():
        for key in sources.pop(name, {}).get("figures", []):
            doc.pop(key, None)
        doc.pop(f"{name}_skipped", None)
        entry = dict(run)
        if f"{name}_skipped" in figures:
            entry["skipped"] = figures[f"{name}_skipped"]
        else:
            entry["figures"] = sorted(figures)
        doc.update(figures)
        sources[name] = entry
    complete = previous is None and set(measured) >= set(every)
    doc["run"] = {**run, "benchmarks": sorted(measured), "complete": complete}
    doc["measured"] = dict(sorted(sources.items()))
    return doc


def _previous(
    previous: Mapping[str, Any], every: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = {k: v for k, v in previous.items() if k not in _META}
    sources = previous.get("measured")
    if isinstance(sources, dict):
        return doc, {k: dict(v) for k, v in sources.items()}
    unknown: Provenance = {"commit": "unknown", "dirty": None, "date": "unknown"}
    attributed: dict[str, Any] = {}
    for key in doc:
        name = _owner(key, every)
        attributed.setdefault(name, dict(unknown, figures=[]))["figures"].append(key)
    return doc, attributed


def _owner(key: str, every: list[str]) -> str:
    """The benchmark a legacy figure belongs to: the longest name it starts with."""
    owners = [n for n in every if key.startswith(f"{n}_")]
    return max(owners, key=len) if owners else "unattributed"


def check_bands(
    figures: Mapping[str, Any], bands: Mapping[str, tuple[str, float, str]]
) -> list[str]:
    """One line per band a figure leaves (or a banded figure missing from ``figures``)."""
    failures = []
    for name, (op, bound, why) in bands.items():
        got = figures.get(name)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            failures.append(f"{name}: not measured ({why})")
        elif not _OPS[op](float(got), bound):
            failures.append(f"{name} = {got:g}, outside {op} {bound:g} ({why})")
    return failures

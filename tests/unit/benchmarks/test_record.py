"""What a benchmark run writes: every figure from this run, or marked with the run it came from."""

from __future__ import annotations

from typing import Any

from benchmarks.record import BANDS, check_bands, merge

EVERY = ("netmap", "reconcile", "kernel_reconcile")
OLD = {"commit": "aaa", "dirty": False, "date": "2026-01-01T00:00:00+00:00"}
NEW = {"commit": "bbb", "dirty": True, "date": "2026-02-01T00:00:00+00:00"}


def full_run() -> dict[str, Any]:
    measured: dict[str, dict[str, float | str]] = {
        "netmap": {"netmap_slope": 0.8},
        "reconcile": {"reconcile_ratio": 1.2, "reconcile_single_frac": 0.02},
        "kernel_reconcile": {"kernel_reconcile_skipped": "no QEMU"},
    }
    return merge(None, measured, OLD, EVERY)


def test_a_full_run_writes_its_figures_skips_and_provenance_only() -> None:
    doc = full_run()
    assert doc["netmap_slope"] == 0.8 and doc["kernel_reconcile_skipped"] == "no QEMU"
    assert doc["run"] == {**OLD, "benchmarks": list(sorted(EVERY)), "complete": True}
    assert doc["measured"]["kernel_reconcile"]["skipped"] == "no QEMU"
    assert doc["measured"]["reconcile"]["figures"] == [
        "reconcile_ratio", "reconcile_single_frac",
    ]  # fmt: skip
    fewer = merge(None, {"netmap": {"netmap_slope": 0.8}}, OLD, EVERY)
    assert fewer["run"]["complete"] is False


def test_a_partial_run_replaces_its_figures_and_keeps_the_others_marked() -> None:
    doc = merge(full_run(), {"reconcile": {"reconcile_ratio": 1.4}}, NEW, EVERY)
    assert doc["reconcile_ratio"] == 1.4
    assert "reconcile_single_frac" not in doc  # not measured by this run: not kept stale
    assert doc["netmap_slope"] == 0.8
    assert doc["measured"]["netmap"]["commit"] == "aaa"
    assert doc["measured"]["reconcile"]["commit"] == "bbb"
    assert doc["run"]["complete"] is False and doc["run"]["benchmarks"] == ["reconcile"]
    again = merge(doc, {"kernel_reconcile": {"kernel_reconcile_ratio": 9.0}}, NEW, EVERY)
    assert "kernel_reconcile_skipped" not in again and again["kernel_reconcile_ratio"] == 9.0
    failed = merge(again, {"netmap": {"netmap_skipped": "failed (exit 1): boom"}}, NEW, EVERY)
    assert "netmap_slope" not in failed and failed["netmap_skipped"] == "failed (exit 1): boom"


def test_figures_of_a_file_without_provenance_are_marked_unknown() -> None:
    legacy = {"netmap_slope": 0.7, "kernel_reconcile_ratio": 12.5, "reconcile_ratio": 2.0}
    doc = merge(legacy, {"reconcile": {"reconcile_ratio": 1.1}}, NEW, EVERY)
    assert doc["measured"]["kernel_reconcile"] == {
        "commit": "unknown", "dirty": None, "date": "unknown",
        "figures": ["kernel_reconcile_ratio"],
    }  # fmt: skip
    assert doc["measured"]["netmap"]["figures"] == ["netmap_slope"]
    assert doc["reconcile_ratio"] == 1.1


def test_bands_fail_figures_outside_them_or_missing() -> None:
    bands = {k: BANDS[k] for k in ("reconcile_single_frac", "reconcile_noop_writes")}
    assert check_bands({"reconcile_single_frac": 0.04, "reconcile_noop_writes": 0.0}, bands) == []
    [line] = check_bands({"reconcile_single_frac": 0.42, "reconcile_noop_writes": 0.0}, bands)
    assert line.startswith("reconcile_single_frac = 0.42, outside <= 0.1")
    assert check_bands({"reconcile_single_frac": 0.01}, bands) == [
        "reconcile_noop_writes: not measured (an unchanged map writes nothing)"
    ]

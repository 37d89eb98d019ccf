"""The soak (tests/soak/driver.py) as tests: a shortened profile in the default suite
(about 3 minutes: 150 simulated agents churning for 2), the full one (300 agents,
35 minutes) behind the ``soak`` marker — ``scripts/soak.sh`` runs it and writes
benchmarks/soak.json — and the memory soak (tests/soak/memory.py) behind it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.harness import lab_requirements
from tests.soak.driver import run_soak
from tests.soak.memory import Plan, run
from tests.soak.profile import CI, FULL, Profile
from tests.soak.report import format_summary

pytestmark = pytest.mark.lab


def soak(profile: Profile, workdir: Path) -> None:
    reason = lab_requirements()
    if reason:
        pytest.skip(reason)
    report = run_soak(profile, workdir)
    summary = format_summary(report)
    print("\n" + summary)
    assert not report["failures"], summary


@pytest.mark.timeout(900)
def test_soak_shortened_profile(tmp_path: Path) -> None:
    """150 agents enroll, stream, rotate, move, drop, come back and are deleted for 2
    minutes while real tunnels carry iperf3 and ping; every invariant and bound holds."""
    soak(CI, tmp_path)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_full_profile(tmp_path: Path) -> None:
    """The full profile: 300 agents for 35 minutes (``scripts/soak.sh``)."""
    soak(FULL, tmp_path)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_memory_soak(tmp_path: Path) -> None:
    """300 agents churn for 35 minutes against two replicas on loopback; each replica's
    RSS grows < 5 % after the 5-minute warm-up (``scripts/soak.sh memory``)."""
    plan = Plan(35.0, 5.0, 300, 2, False, (), 15, FULL.bounds)
    report = run(plan, tmp_path)
    assert not report["failures"], report["rss"]

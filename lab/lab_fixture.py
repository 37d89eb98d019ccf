"""The ``lab`` fixture: a fresh network-namespace lab per test, torn down even on failure.

A tier's conftest imports ``lab`` and ``pytest_runtest_makereport`` (the hook that lets
the fixture print process logs when the test failed).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from lab.harness import Lab, lab_requirements


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Remember each phase's report on the item so fixtures can see whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def lab_failed(request: pytest.FixtureRequest) -> bool:
    reports = [getattr(request.node, f"rep_{when}", None) for when in ("setup", "call")]
    return any(r is not None and r.failed for r in reports)


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    reason = lab_requirements()
    if reason:
        pytest.skip(reason)
    with Lab(workdir=tmp_path / "lab") as the_lab:
        yield the_lab
        if lab_failed(request):
            print(f"\n---- lab {the_lab.prefix} process logs ----\n{the_lab.logs()}")

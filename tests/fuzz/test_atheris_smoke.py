"""Each atheris harness in tests/fuzz runs a bounded campaign cleanly (CI-sized).

A harness exits non-zero on any exception other than its target's named
errors or on a broken property, and writes the input that did it to the
artifact prefix; the long campaign is ``scripts/fuzz.sh`` (docs/reports/fuzzing.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"
# runs per harness: the whole set stays well under a minute on two shared cores
RUNS = {
    "fuzz_stun": 20_000,
    "fuzz_relay_control": 20_000,
    "fuzz_tickets": 20_000,
    "fuzz_uapi": 20_000,
    "fuzz_policy": 20_000,
    "fuzz_agentmsg": 20_000,
}


def test_every_harness_is_listed() -> None:
    assert {p.stem for p in FUZZ_DIR.glob("fuzz_*.py")} == set(RUNS)


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_harness_runs_clean(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    args = [
        sys.executable,
        str(FUZZ_DIR / f"{harness}.py"),
        f"-runs={RUNS[harness]}",
        "-seed=1",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {RUNS[harness]} runs" in done.stderr
    assert any(corpus.iterdir()), "the seed corpus was not written"
    assert not list(tmp_path.glob("crash-*")), done.stderr[-3000:]

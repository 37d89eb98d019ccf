"""What every atheris harness here shares: the seed corpus and libFuzzer's arguments.

A harness is run as ``python tests/fuzz/fuzz_X.py [libFuzzer flags] [CORPUS_DIR ...]``
(``-runs=N``, ``-max_total_time=S``, ``-seed=N``...). Without a corpus directory
the seeds (valid messages built by the project's own encoders) go to a fresh
temporary one; a corpus directory that is empty gets the seeds first, so a
long campaign (scripts/fuzz.sh) keeps what it learned between runs. Files
instead of directories are replayed: ``python tests/fuzz/fuzz_X.py crash-...``.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris

__all__ = ["PROJECT", "fuzz"]

PROJECT = ["gateway", "identity", "relay"]  # the packages worth instrumenting


def _seeded(argv: list[str], seeds: Iterable[bytes]) -> list[str]:
    dirs = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if any(d.is_file() for d in dirs):
        return argv  # replaying inputs (a crash-* file): libFuzzer runs each once
    if not dirs:
        dirs = [Path(tempfile.mkdtemp(prefix="wiregate-fuzz-"))]
        argv = [*argv, str(dirs[0])]
    corpus = dirs[0]
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
    return argv


def fuzz(test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Run libFuzzer on ``test_one_input`` with ``sys.argv`` and the seed corpus."""
    atheris.Setup(_seeded(list(sys.argv), seeds), test_one_input)
    atheris.Fuzz()

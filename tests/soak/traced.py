"""``python -m tests.soak.traced ARGS…``: ``wiregate ARGS…`` with memory introspection.

Writes into ``$WIREGATE_TRACEMALLOC_DIR``:

* on SIGUSR2, one JSON line appended to ``stats.jsonl``: VmRSS, the interpreter's
  allocated blocks, the number of objects the garbage collector tracks and glibc's
  ``mallinfo2`` (heap in use, free inside the heap, mmapped) — cheap, so untraced
  runs sample it too, and it tells Python objects from allocator fragmentation;
* with ``WIREGATE_TRACEMALLOC_FRAMES`` > 0, tracemalloc runs with that many frames
  per allocation and each SIGUSR1 writes ``snapshot-N.pickle`` (N from 0; the file
  appears whole, by rename).

tests/soak/memory.py starts the gateway replicas this way. Debugging only:
tracing slows the process and costs memory of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType

__all__ = ["SNAPSHOT_PATTERN", "STATS_FILE", "main", "memory_stats"]

SNAPSHOT_PATTERN = "snapshot-{}.pickle"
STATS_FILE = "stats.jsonl"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def _mallinfo() -> dict[str, int]:
    """glibc's heap figures in KiB (empty elsewhere): ``arena`` (the brk heap),
    ``in_use``, ``free`` (inside the heaps), ``mmapped``."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"arena_kb": info.arena >> 10, "in_use_kb": info.uordblks >> 10,
            "free_kb": info.fordblks >> 10, "mmapped_kb": info.hblkhd >> 10}  # fmt: skip


def memory_stats() -> dict[str, float | int]:
    """This process's memory figures now (see the module docstring)."""
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    stats: dict[str, float | int] = {
        "time": time.time(),
        "rss_kb": rss,
        "allocated_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
    }
    if tracemalloc.is_tracing():
        stats["traced_kb"] = tracemalloc.get_traced_memory()[0] >> 10
    return stats | _mallinfo()


def _install(directory: Path) -> None:
    taken = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal taken
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        path = directory / SNAPSHOT_PATTERN.format(taken)
        partial = path.with_suffix(".partial")
        snapshot.dump(str(partial))
        partial.rename(path)
        taken += 1

    def stats(_signum: int, _frame: FrameType | None) -> None:
        with (directory / STATS_FILE).open("a") as out:
            out.write(json.dumps(memory_stats()) + "\n")

    if tracemalloc.is_tracing():
        signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, stats)


def main() -> int:
    directory = Path(os.environ["WIREGATE_TRACEMALLOC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    frames = int(os.environ.get("WIREGATE_TRACEMALLOC_FRAMES", "0"))
    if frames > 0:
        tracemalloc.start(frames)
    _install(directory)
    from wiregate.cli.main import main as wiregate

    wiregate(args=sys.argv[1:], prog_name="wiregate")
    return 0


if __name__ == "__main__":
    sys.exit(main())

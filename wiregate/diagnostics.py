"""Process-level gauges the gateway exports next to prometheus_client's own
``process_*`` series (open fds, resident memory): the number of asyncio tasks, read at
scrape time (a leak of tasks shows as a climbing line)."""

from __future__ import annotations

import asyncio

from prometheus_client import Gauge

__all__ = ["ASYNCIO_TASKS", "asyncio_tasks"]


def asyncio_tasks() -> int:
    """Tasks of the running loop not yet done (0 outside a loop)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


ASYNCIO_TASKS = Gauge("wiregate_asyncio_tasks", "asyncio tasks alive in this process")
ASYNCIO_TASKS.set_function(asyncio_tasks)

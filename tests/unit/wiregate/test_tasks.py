"""wiregate/tasks.py: a background task is cancelled and waited for."""

from __future__ import annotations

import asyncio

from wiregate.tasks import cancel_and_wait


async def test_a_running_task_is_cancelled_and_has_unwound() -> None:
    unwound: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.append(True)

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and unwound == [True]


async def test_none_and_a_finished_task_are_left_alone() -> None:
    await cancel_and_wait(None)
    task = asyncio.create_task(asyncio.sleep(0, result=7))
    await task
    await cancel_and_wait(task)
    assert task.result() == 7

"""``IN`` lists come in a few lengths (gateway/store/rows.py ``in_list``), so that the
statements a pooled connection prepares and keeps stay few however many devices a
query names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event

from gateway.store.rows import in_list
from gateway.store.store import Store


def test_an_in_list_is_padded_to_a_power_of_two_with_the_same_values() -> None:
    assert in_list([]) == []
    assert in_list(["b"]) == ["b"]
    assert in_list(["c", "a", "b"]) == ["a", "b", "c", "c"]
    for n in range(1, 501):
        padded = in_list([f"d{i:03d}" for i in range(n)])
        assert len(padded) >= n and len(padded) & (len(padded) - 1) == 0
        assert len(padded) < 2 * n and set(padded) == {f"d{i:03d}" for i in range(n)}


async def test_touching_any_number_of_devices_takes_a_few_statements(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'wiregate.db'}")
    updates: set[str] = set()

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("UPDATE devices"):
            updates.add(statement)

    event.listen(store._engine.sync_engine, "before_cursor_execute", seen)
    try:
        for n in range(1, 129):
            await store.touch_many([f"dev_{i}" for i in range(n)])
    finally:
        await store.close()
    assert len(updates) == 8  # 1, 2, 4, ... 128 values: not 128 statements

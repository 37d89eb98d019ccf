"""Store cases of the nodes' pods (gateway/store/pods.py), run on SQLite by
tests/unit/gateway/test_pod_store.py and on PostgreSQL by
tests/service/test_pod_store_postgres.py (each provides ``db_url``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.store import Store
from gateway.store.pods import MAX_ROWS_PER_NODE
from gateway.store.replication import ChangeKind
from lab.path_store_cases import devices, store
from wiregate.errors import Conflict, NotFound
from wiregate.podwire import Pod, PodReport

__all__ = [
    "store",
    "test_a_report_for_a_deleted_node_or_too_many_pods_keeps_nothing",
    "test_reports_replace_add_and_remove_and_go_with_the_node",
]

POD = Pod("payments", "ledger-1", ("10.244.1.5", "fd00::5"), "ledger", (("app", "ledger"),))


async def test_reports_replace_add_and_remove_and_go_with_the_node(store: Store) -> None:
    node, other = await devices(store, "node", "other")
    second = replace(POD, name="ledger-2", ips=("10.244.1.6",))
    first = await store.record_pods(node, PodReport(True, (POD, second)))
    await store.record_pods(other, PodReport(True, (replace(POD, ips=()),)))
    relabelled = replace(POD, labels=(("app", "other"), ("tier", "db")))
    await store.record_pods(node, PodReport(False, (relabelled,), ("payments/ledger-2",)))
    assert (await store.list_pods())[node] == [relabelled]
    version = await store.record_pods(node, PodReport(True, (second,)))
    assert version == first + 3
    found = await store.changes_since(first - 1)
    assert found is not None
    (change, record), *_ = found[1]
    assert change.kind is ChangeKind.PODS and record is None
    assert found[1][-1][0].pods == (second,)  # the snapshot's pods, not the message's
    await store.delete_device(node)
    assert list(await store.list_pods()) == [other]


async def test_a_report_for_a_deleted_node_or_too_many_pods_keeps_nothing(store: Store) -> None:
    node, gone = await devices(store, "node", "gone")
    await store.delete_device(gone)
    version = await store.map_version()
    with pytest.raises(NotFound):
        await store.record_pods(gone, PodReport(True, (POD,)))
    many = tuple(replace(POD, name=f"p{i}") for i in range(MAX_ROWS_PER_NODE))
    await store.record_pods(node, PodReport(True, many))
    with pytest.raises(Conflict):
        await store.record_pods(node, PodReport(False, (replace(POD, name="one-more"),)))
    assert len((await store.list_pods())[node]) == MAX_ROWS_PER_NODE
    assert await store.map_version() == version + 1

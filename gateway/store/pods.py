"""Nodes' pod reports in the store: one row per pod as its node reported it, replaced or
removed by each ``pods`` message and deleted with the node (``ON DELETE CASCADE``), so
that every replica reads the same pods at the same map version. Whether a pod's
addresses are the node's to claim is each broker's check (:mod:`gateway.mapping.pods`),
against the routes the policy approves at that version. :class:`~gateway.store.Store`
wraps these."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.store.models import PodRow
from gateway.store.replication import insert_for
from gateway.store.rows import in_list
from wiregate.podwire import Pod, PodReport

__all__ = ["MAX_ROWS_PER_NODE", "apply", "count", "read"]

MAX_ROWS_PER_NODE = 1000


async def apply(s: AsyncSession, device_id: str, report: PodReport) -> None:
    """Apply a node's report to its rows: ``full`` replaces them all."""
    if report.full:
        await s.execute(delete(PodRow).where(PodRow.device_id == device_id))
    elif report.remove:
        keys = [tuple(key.split("/")) for key in report.remove]
        await s.execute(
            delete(PodRow).where(
                PodRow.device_id == device_id,
                tuple_(PodRow.namespace, PodRow.name).in_(keys),
            )
        )
    if not report.upsert:
        return
    table = PodRow.__table__
    stmt = insert_for(s, table).values([_values(device_id, pod) for pod in report.upsert])
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.device_id, table.c.namespace, table.c.name],
        set_={name: stmt.excluded[name] for name in ("ips", "service_account", "labels")},
    )
    await s.execute(stmt)


async def count(s: AsyncSession, device_id: str) -> int:
    """How many pods a node has in the store."""
    query = select(func.count()).select_from(PodRow).where(PodRow.device_id == device_id)
    return int((await s.execute(query)).scalar_one())


async def read(s: AsyncSession, device_ids: Collection[str] | None = None) -> dict[str, list[Pod]]:
    """The pods of every node (or of ``device_ids``), by node, each node's by key."""
    query = select(PodRow).order_by(PodRow.device_id, PodRow.namespace, PodRow.name)
    if device_ids is not None:
        query = query.where(PodRow.device_id.in_(in_list(device_ids)))
    out: dict[str, list[Pod]] = {}
    for row in (await s.execute(query)).scalars():
        out.setdefault(row.device_id, []).append(_pod(row))
    return out


def _values(device_id: str, pod: Pod) -> dict[str, object]:
    return {
        "device_id": device_id,
        "namespace": pod.namespace,
        "name": pod.name,
        "ips": list(pod.ips),
        "service_account": pod.service_account,
        "labels": dict(pod.labels),
    }


def _pod(row: PodRow) -> Pod:
    labels = tuple(sorted(row.labels.items()))
    return Pod(row.namespace, row.name, tuple(row.ips), row.service_account, labels)

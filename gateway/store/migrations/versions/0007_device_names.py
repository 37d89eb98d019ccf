"""Device names become unique DNS labels (mesh DNS names devices by them).

Every name that is not a label is made one (``Web_01`` → ``web-01``) and every
name a device older than it already has gets the first free ``-N`` suffix, oldest
device first; each renamed device takes a map version of its own with its change
recorded (replicas following the feed see it) and an audit record
(``system:migration``). Then ``devices.name`` gets a unique index.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

from gateway.store.names import next_free, to_label

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_CHANGES = sa.table(
    "map_changes",
    sa.column("version", sa.BigInteger()),
    sa.column("kind", sa.String()),
    sa.column("device_id", sa.String()),
    sa.column("reason", sa.String()),
    sa.column("at", sa.Float()),
)
_AUDIT = sa.table(
    "audit_log",
    sa.column("at", sa.Float()),
    sa.column("actor", sa.String()),
    sa.column("action", sa.String()),
    sa.column("target", sa.String()),
    sa.column("detail", sa.JSON()),
)


def upgrade() -> None:
    """Rename the devices whose name is not a unique label; index ``devices.name``."""
    bind = op.get_bind()
    renames = _renames(bind)
    if renames:
        _apply(bind, renames)
    op.create_index(op.f("ix_devices_name"), "devices", ["name"], unique=True)


def _renames(bind: sa.Connection) -> list[tuple[str, str, str]]:
    """``(device id, old name, new name)`` for each device to rename, oldest first."""
    rows = bind.execute(sa.text("SELECT id, name FROM devices ORDER BY created_at, id")).all()
    taken: set[str] = set()
    renames = []
    for device_id, name in rows:
        new = next_free(to_label(name), taken)
        taken.add(new)
        if new != name:
            renames.append((str(device_id), str(name), new))
    return renames


def _apply(bind: sa.Connection, renames: list[tuple[str, str, str]]) -> None:
    now = time.time()
    base = int(bind.execute(sa.text("SELECT map_version FROM meta WHERE id = 1")).scalar_one())
    rename = sa.text("UPDATE devices SET name = :name WHERE id = :id")
    for device_id, _old, new in renames:  # the unique index comes after
        bind.execute(rename, {"name": new, "id": device_id})
    versions = range(base + 1, base + 1 + len(renames))
    bind.execute(sa.insert(_CHANGES), [
        {"version": v, "kind": "upsert", "device_id": d, "reason": None, "at": now}
        for v, (d, _old, _new) in zip(versions, renames, strict=True)
    ])  # fmt: skip
    bind.execute(sa.insert(_AUDIT), [
        {"at": now, "actor": "system:migration", "action": "device.rename", "target": d,
         "detail": {"from": old, "to": new}}
        for d, old, new in renames
    ])  # fmt: skip
    bind.execute(sa.text("UPDATE meta SET map_version = :v WHERE id = 1"), {"v": versions[-1]})


def downgrade() -> None:
    """Drop the index (names stay as renamed)."""
    op.drop_index(op.f("ix_devices_name"), table_name="devices")

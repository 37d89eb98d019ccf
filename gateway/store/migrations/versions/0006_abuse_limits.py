"""State every replica shares against abuse: rate buckets, signed-out web sessions,
the source of each login request, and the history of every device public key.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_KEY_FIELDS = ("public_key", "previous_public_key")


def upgrade() -> None:
    """Create ``rate_buckets``, ``ended_sessions`` and ``key_history`` (filled with the keys
    of today's devices and those the audit log names), add ``login_requests.source``."""
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(96), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_buckets")),
    )
    op.create_index(op.f("ix_rate_buckets_updated"), "rate_buckets", ["updated"])
    op.create_table(
        "ended_sessions",
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_ended_sessions")),
    )
    op.create_index(op.f("ix_ended_sessions_expires_at"), "ended_sessions", ["expires_at"])
    history = op.create_table(
        "key_history",
        sa.Column("public_key", sa.String(44), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("first_used_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("public_key", name=op.f("pk_key_history")),
    )
    with op.batch_alter_table("login_requests") as batch:
        batch.add_column(sa.Column("source", sa.String(64), nullable=False, server_default=""))
        batch.create_index(batch.f("ix_login_requests_source"), ["source"])
    rows = _known_keys(op.get_bind())
    if rows:
        op.bulk_insert(history, rows)


def _known_keys(bind: sa.Connection) -> list[dict[str, Any]]:
    """Every key a device has or had that the database still names, once each."""
    seen: dict[str, dict[str, Any]] = {}
    devices = bind.execute(
        sa.text("SELECT id, public_key, previous_public_key, created_at FROM devices")
    )
    for device_id, key, previous, created_at in devices:
        for k in (key, previous):
            if k:
                seen.setdefault(k, {"public_key": k, "device_id": device_id,
                                    "first_used_at": created_at})  # fmt: skip
    audit = bind.execute(
        sa.text("SELECT target, detail, at FROM audit_log WHERE action IN "
                "('device.enroll', 'device.rotate', 'device.delete', 'device.replace')")
    )  # fmt: skip
    for target, detail, at in audit:
        found = json.loads(detail) if isinstance(detail, str) else detail
        for field in _KEY_FIELDS:
            k = found.get(field) if isinstance(found, dict) else None
            if isinstance(k, str) and 0 < len(k) <= 44:
                seen.setdefault(k, {"public_key": k, "device_id": str(target)[:32],
                                    "first_used_at": at})  # fmt: skip
    return list(seen.values())


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    with op.batch_alter_table("login_requests") as batch:
        batch.drop_index(batch.f("ix_login_requests_source"))
        batch.drop_column("source")
    op.drop_table("key_history")
    op.drop_index(op.f("ix_ended_sessions_expires_at"), table_name="ended_sessions")
    op.drop_table("ended_sessions")
    op.drop_index(op.f("ix_rate_buckets_updated"), table_name="rate_buckets")
    op.drop_table("rate_buckets")

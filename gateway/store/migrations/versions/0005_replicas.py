"""Tables replicas share: the map change feed, leases for run-once duties, relay pairs.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``map_changes``, ``leases`` and ``relay_pairs``; ``meta.changes_floor`` starts
    at the current version (no change before it was recorded)."""
    with op.batch_alter_table("meta") as batch:
        batch.add_column(
            sa.Column("changes_floor", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.execute("UPDATE meta SET changes_floor = map_version")
    op.create_table(
        "map_changes",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_map_changes")),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "relay_pairs",
        sa.Column("device_a", sa.String(32), nullable=False),
        sa.Column("device_b", sa.String(32), nullable=False),
        sa.Column("relay_id", sa.String(64), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_a", "device_b", name=op.f("pk_relay_pairs")),
    )


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_table("relay_pairs")
    op.drop_table("leases")
    op.drop_table("map_changes")
    with op.batch_alter_table("meta") as batch:
        batch.drop_column("changes_floor")

"""Pods: what each node reported of the pods scheduled on it, for the policy's pod
selectors, so that every replica compiles the same maps.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``pods``."""
    op.create_table(
        "pods",
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("ips", sa.JSON(), nullable=False),
        sa.Column("service_account", sa.String(253), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"],
            name=op.f("fk_pods_device_id_devices"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "namespace", "name", name=op.f("pk_pods")),
    )  # fmt: skip


def downgrade() -> None:
    """Drop ``pods``."""
    op.drop_table("pods")

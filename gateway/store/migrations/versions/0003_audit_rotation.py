"""Audit log, disabled identities, key rotation and device-key expiry per enrollment key.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``audit_log``; add the rotation, expiry and disabled columns."""
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(1100), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(1100), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    with op.batch_alter_table("identities") as batch:
        batch.add_column(
            sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("previous_public_key", sa.String(44), nullable=True))
        batch.add_column(sa.Column("key_rotated_at", sa.Float(), nullable=True))
    with op.batch_alter_table("enrollment_keys") as batch:
        batch.add_column(sa.Column("device_key_expiry", sa.Float(), nullable=True))


def downgrade() -> None:
    """Drop what :func:`upgrade` added (the audit log is lost)."""
    with op.batch_alter_table("enrollment_keys") as batch:
        batch.drop_column("device_key_expiry")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("key_rotated_at")
        batch.drop_column("previous_public_key")
    with op.batch_alter_table("identities") as batch:
        batch.drop_column("disabled")
    op.drop_index("ix_audit_log_action", table_name="audit_log")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")

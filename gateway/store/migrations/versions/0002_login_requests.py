"""Device login requests (``wiregate login``).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``login_requests``."""
    op.create_table(
        "login_requests",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_code_hash", sa.String(64), nullable=False),
        sa.Column("poll_token_hash", sa.String(64), nullable=False),
        sa.Column("public_key", sa.String(44), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("last_poll_at", sa.Float(), nullable=True),
        sa.Column("interval", sa.Integer(), nullable=False),
        sa.Column("approved_by_issuer", sa.String(512), nullable=True),
        sa.Column("approved_by_subject", sa.String(512), nullable=True),
        sa.Column("device_id", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_login_requests_device_id_devices",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_login_requests"),
        sa.UniqueConstraint("user_code_hash", name="uq_login_requests_user_code_hash"),
        sa.UniqueConstraint("poll_token_hash", name="uq_login_requests_poll_token_hash"),
    )
    op.create_index("ix_login_requests_status", "login_requests", ["status"])


def downgrade() -> None:
    """Drop ``login_requests`` (pending logins are lost)."""
    op.drop_index("ix_login_requests_status", table_name="login_requests")
    op.drop_table("login_requests")

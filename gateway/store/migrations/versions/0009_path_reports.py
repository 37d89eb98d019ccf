"""Path reports: each agent's path to each peer (path MTU, black hole, path kind), the
fleet's fragmentation matrix.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``path_reports``."""
    op.create_table(
        "path_reports",
        sa.Column("reporter_id", sa.String(32), nullable=False),
        sa.Column("peer_id", sa.String(32), nullable=False),
        sa.Column("path_mtu", sa.Integer(), nullable=True),
        sa.Column("black_hole", sa.Boolean(), nullable=False),
        sa.Column("frag_needed", sa.BigInteger(), nullable=False),
        sa.Column("probe_failures", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(16), nullable=False),
        sa.Column("relay_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("handshake_age", sa.Float(), nullable=True),
        sa.Column("rtt_ms", sa.Float(), nullable=True),
        sa.Column("reported_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["reporter_id"], ["devices.id"],
            name=op.f("fk_path_reports_reporter_id_devices"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["devices.id"],
            name=op.f("fk_path_reports_peer_id_devices"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("reporter_id", "peer_id", name=op.f("pk_path_reports")),
    )  # fmt: skip
    op.create_index(op.f("ix_path_reports_peer_id"), "path_reports", ["peer_id"])


def downgrade() -> None:
    """Drop ``path_reports``."""
    op.drop_index(op.f("ix_path_reports_peer_id"), table_name="path_reports")
    op.drop_table("path_reports")

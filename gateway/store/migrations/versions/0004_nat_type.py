"""Each device's NAT type as its agent last measured it (peers use it to skip futile probes).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``devices.nat_type`` (NULL: not measured yet)."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("nat_type", sa.String(16), nullable=True))


def downgrade() -> None:
    """Drop ``devices.nat_type``."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("nat_type")

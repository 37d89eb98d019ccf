"""Each device's agent version and operating system, as its agent last said (the console
shows them; not part of the map).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``devices.agent_version`` and ``devices.agent_os`` (NULL: not said yet)."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("agent_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("agent_os", sa.String(128), nullable=True))


def downgrade() -> None:
    """Drop ``devices.agent_version`` and ``devices.agent_os``."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("agent_os")
        batch.drop_column("agent_version")

"""A person's email (verified) and display name on their identity, as their IdP said when
they last approved a device login on the web pages (``wiregate whois`` shows them).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``identities.email`` and ``identities.name`` (NULL: not known)."""
    with op.batch_alter_table("identities") as batch:
        batch.add_column(sa.Column("email", sa.String(320), nullable=True))
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))


def downgrade() -> None:
    """Drop ``identities.email`` and ``identities.name``."""
    with op.batch_alter_table("identities") as batch:
        batch.drop_column("name")
        batch.drop_column("email")

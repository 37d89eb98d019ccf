"""Initial schema: meta, identities, devices, enrollment keys.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables of the first release."""
    _meta()
    _identities()
    _devices()
    _enrollment_keys()


def downgrade() -> None:
    """Drop every table (loses all state)."""
    for table in ("enrollment_keys", "devices", "identities", "meta"):
        op.drop_table(table)


def _meta() -> None:
    op.create_table(
        "meta",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("map_version", sa.BigInteger(), nullable=False),
        sa.Column("ipv4_pool", sa.String(64), nullable=False),
        sa.Column("ipv6_pool", sa.String(64), nullable=False),
        sa.Column("ipam_cursor", sa.Integer(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_meta_single_row"),
        sa.PrimaryKeyConstraint("id", name="pk_meta"),
    )


def _identities() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("issuer", sa.String(512), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_identities"),
        sa.UniqueConstraint("issuer", "subject", name="uq_identities_issuer"),
    )


def _devices() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("public_key", sa.String(44), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("ip_index", sa.Integer(), nullable=False),
        sa.Column("ipv4", sa.String(45), nullable=False),
        sa.Column("ipv6", sa.String(45), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("endpoints", sa.JSON(), nullable=False),
        sa.Column("routes", sa.JSON(), nullable=False),
        sa.Column("keepalive", sa.Integer(), nullable=True),
        sa.Column("ephemeral", sa.Boolean(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["identities.id"],
            name="fk_devices_identity_id_identities",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.UniqueConstraint("public_key", name="uq_devices_public_key"),
        sa.UniqueConstraint("ip_index", name="uq_devices_ip_index"),
        sa.UniqueConstraint("ipv4", name="uq_devices_ipv4"),
        sa.UniqueConstraint("ipv6", name="uq_devices_ipv6"),
        sa.UniqueConstraint("token_hash", name="uq_devices_token_hash"),
    )
    op.create_index("ix_devices_identity_id", "devices", ["identity_id"])


def _enrollment_keys() -> None:
    op.create_table(
        "enrollment_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("reusable", sa.Boolean(), nullable=False),
        sa.Column("ephemeral", sa.Boolean(), nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_count", sa.Integer(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment_keys"),
        sa.UniqueConstraint("secret_hash", name="uq_enrollment_keys_secret_hash"),
    )

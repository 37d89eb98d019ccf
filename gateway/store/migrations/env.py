"""Alembic environment: runs on a connection handed over by :mod:`gateway.store.migrate`."""

from __future__ import annotations

from alembic import context

from gateway.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("wiregate migrations run through gateway.store.migrate, not the CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

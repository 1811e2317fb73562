"""Alembic environment: migrations run on the connection handed over by :func:`convlens.study.store.db.upgrade`."""

from __future__ import annotations

from alembic import context

from convlens.study.store.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the study migrations through convlens.study.store.db.upgrade(engine)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

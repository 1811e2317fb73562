"""Alembic migrations of the Deep Reveal study database (run by :func:`convlens.study.store.db.upgrade`)."""

"""What a study keeps: its settings and rounds (``config``: study.json, rounds.json, secrets.json) and its
database (``db``: SQLAlchemy models, durable engines, Alembic upgrade; ``migrations/``)."""

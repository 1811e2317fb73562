"""What a study keeps: its settings and rounds (``config``: study.json, rounds.json, secrets.json), its
database (``db``: SQLAlchemy models, durable engines, Alembic upgrade; ``migrations/``) and its backups
(``backup``: SQLite's online backup while serving)."""

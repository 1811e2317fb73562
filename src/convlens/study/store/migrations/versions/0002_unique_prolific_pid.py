"""One registration per Prolific participant id: a unique index on participants.prolific_pid.

NULLs (players who came without a Prolific id) stay allowed on SQLite and PostgreSQL alike: both treat
NULLs as distinct in a unique index. A database that already holds the same id twice (registered before
this check existed) is refused with the ids to resolve, rather than silently edited.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEX = "uq_participant_prolific_pid"


def _refuse_duplicates() -> None:
    query = sa.text("SELECT prolific_pid FROM participants WHERE prolific_pid IS NOT NULL "
                    "GROUP BY prolific_pid HAVING COUNT(*) > 1 ORDER BY prolific_pid")
    duplicated = [row[0] for row in op.get_bind().execute(query)]
    if duplicated:
        from convlens.study.game.opening import StudyDatabaseError

        raise StudyDatabaseError(f"participants.prolific_pid: {len(duplicated)} Prolific id(s) registered more "
                                 f"than once (e.g. {duplicated[0]!r}); export the study, resolve them, then "
                                 "migrate again")


def upgrade() -> None:
    _refuse_duplicates()
    op.create_index(INDEX, "participants", ["prolific_pid"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="participants")

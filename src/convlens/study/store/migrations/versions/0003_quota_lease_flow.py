"""Quota, leases, the describe-before-answer flow and admin sign-out.

* ``participants``: ``quota`` (rounds to finish, fixed at consent), ``lease_expires_at`` (indexed: the
  server's sweep finds expired participants by it) and ``completed_at``.
* ``planned_rounds``: the rounds reserved for a participant at consent, not yet shown.
* ``plays``: ``description_screen`` records what was on screen when the description was written.
* ``events``: ``screen`` — what the player had on screen: ``level`` (the play's reveal level, answer
  hidden) or ``answer`` (the full image and the true class). Rows written before this revision were
  written by the former flow, which asked for the description after showing the answer: their describe
  events (and the described plays) are marked ``answer``, everything else ``level``.
* ``admin_signouts``: admin cookies signed out before their expiry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("participants") as batch:
        batch.add_column(sa.Column("quota", sa.Integer()))
        batch.add_column(sa.Column("lease_expires_at", TIME))
        batch.add_column(sa.Column("completed_at", TIME))
        batch.create_index("ix_participants_lease_expires_at", ["lease_expires_at"])
    with op.batch_alter_table("plays") as batch:
        batch.add_column(sa.Column("description_screen", sa.String(10)))
    op.create_table(
        "planned_rounds",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("participant_id", ID, sa.ForeignKey("participants.id"), nullable=False, index=True),
        sa.Column("round_id", sa.String(16), sa.ForeignKey("rounds.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.UniqueConstraint("participant_id", "round_id", name="uq_planned_participant_round"),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("screen", sa.String(10), nullable=False, server_default="level"))
    with op.batch_alter_table("events") as batch:
        batch.alter_column("screen", existing_type=sa.String(10), server_default=None)
    op.execute("UPDATE events SET screen = 'answer' WHERE type = 'describe'")
    op.execute("UPDATE plays SET description_screen = 'answer' WHERE description IS NOT NULL")
    op.create_table(
        "admin_signouts",
        sa.Column("cookie_id", sa.String(32), primary_key=True),
        sa.Column("signed_out_at", TIME, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("admin_signouts")
    op.drop_table("planned_rounds")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("screen")
    with op.batch_alter_table("plays") as batch:
        batch.drop_column("description_screen")
    with op.batch_alter_table("participants") as batch:
        batch.drop_index("ix_participants_lease_expires_at")
        batch.drop_column("completed_at")
        batch.drop_column("lease_expires_at")
        batch.drop_column("quota")

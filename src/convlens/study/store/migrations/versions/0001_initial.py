"""Initial Deep Reveal schema: study_meta, rounds, participants, plays, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)


def _create_study_meta() -> None:
    op.create_table(
        "study_meta",
        sa.Column("key", sa.String(40), primary_key=True),
        sa.Column("value", sa.String(200), nullable=False),
    )


def _create_rounds() -> None:
    op.create_table(
        "rounds",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("cluster_id", sa.String(300)),
        sa.Column("image_id", sa.String(64), nullable=False),
        sa.Column("image_name", sa.String(300), nullable=False),
        sa.Column("layer", sa.String(300)),
        sa.Column("layer_depth", sa.Integer()),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("cluster_index", sa.Integer()),
        sa.Column("cluster_weight", sa.Float()),
        sa.Column("fmap_count", sa.Integer()),
        sa.Column("true_class", sa.String(100), nullable=False),
        sa.Column("gold", sa.Boolean(), nullable=False),
        sa.Column("inv_run", sa.String(300), nullable=False),
        sa.Column("assigned", sa.Integer(), nullable=False),
    )


def _create_participants() -> None:
    op.create_table(
        "participants",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("public_id", sa.String(32), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("nickname", sa.String(100)),
        sa.Column("prolific_pid", sa.String(64)),
        sa.Column("study_id_param", sa.String(64)),
        sa.Column("session_id_param", sa.String(64)),
        sa.Column("consent_version", sa.String(40), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("plays", sa.Integer(), nullable=False),
        sa.Column("wins", sa.Integer(), nullable=False),
        sa.Column("gold_plays", sa.Integer(), nullable=False),
        sa.Column("gold_correct", sa.Integer(), nullable=False),
    )


def _create_plays() -> None:
    op.create_table(
        "plays",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("public_id", sa.String(32), nullable=False, unique=True),
        sa.Column("participant_id", ID, sa.ForeignKey("participants.id"), nullable=False, index=True),
        sa.Column("round_id", sa.String(16), sa.ForeignKey("rounds.id"), nullable=False, index=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("image_token", sa.String(64), unique=True),
        sa.Column("guessed_class", sa.String(100)),
        sa.Column("correct", sa.Boolean()),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("language", sa.String(35)),
        sa.Column("started_at", TIME, nullable=False),
        sa.Column("ended_at", TIME),
        sa.UniqueConstraint("participant_id", "round_id", name="uq_play_participant_round"),
    )


def _create_events() -> None:
    op.create_table(
        "events",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("play_id", ID, sa.ForeignKey("plays.id"), nullable=False, index=True),
        sa.Column("participant_id", ID, sa.ForeignKey("participants.id"), nullable=False),
        sa.Column("round_id", sa.String(16), nullable=False),
        sa.Column("type", sa.String(10), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("guessed_class", sa.String(100)),
        sa.Column("text", sa.Text()),
        sa.Column("language", sa.String(35)),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.UniqueConstraint("participant_id", "request_id", name="uq_event_request"),
    )


def upgrade() -> None:
    _create_study_meta()
    _create_rounds()
    _create_participants()
    _create_plays()
    _create_events()


def downgrade() -> None:
    for table in ("events", "plays", "participants", "rounds", "study_meta"):
        op.drop_table(table)

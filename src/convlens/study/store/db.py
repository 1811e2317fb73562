"""Database of a Deep Reveal study: SQLAlchemy 2 models, engines with durable commits, Alembic upgrade.

Tables: ``study_meta`` (which study owns the database), ``rounds`` (from rounds.json, with an ``assigned``
counter for the plays-per-round cap: plays planned, running or finished), ``participants`` (pseudonymous;
running totals for the leaderboard; a Prolific id at most once; their quota and lease), ``planned_rounds``
(the rounds reserved for a participant at consent, not yet shown, each at a position of the participant's
sequence), ``plays`` (one participant and one round once shown, unique per pair; state ``active`` ->
``guessed`` (description asked, answer still hidden) -> ``win`` | ``lose``, or ``resign``, or ``abandoned``
(the lease ran out)), ``events``
(append-only log of start / reveal / guess / describe / skip / resign / expire with what the player had on
screen; unique per participant and client request id, so a retried request is never stored twice) and
``admin_signouts`` (admin cookies signed out before they expire).

Durability: SQLite runs in WAL mode with ``synchronous=FULL`` (every commit fsyncs the log) and writing
transactions start with ``BEGIN IMMEDIATE`` (no lock-upgrade deadlocks between threads or worker
processes; a 30 s busy timeout queues writers). PostgreSQL keeps its defaults ``fsync=on``,
``synchronous_commit=on``. A request is answered only after its transaction committed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

__all__ = [
    "HEAD",
    "AdminSignout",
    "Base",
    "Event",
    "Participant",
    "PlannedRound",
    "Play",
    "Round",
    "StudyMeta",
    "current_revision",
    "make_engine",
    "make_sessions",
    "schema_revision",
    "upgrade",
    "utcnow",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD = "0003"  # the newest migration (tests/study/test_hardening.py checks it against Alembic's script folder)
SQLITE_BUSY_TIMEOUT_S = 30.0
ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite auto-increments INTEGER PRIMARY KEY only


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class StudyMeta(Base):
    __tablename__ = "study_meta"
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    cluster_id: Mapped[str | None] = mapped_column(String(300))
    image_id: Mapped[str] = mapped_column(String(64))
    image_name: Mapped[str] = mapped_column(String(300))
    layer: Mapped[str | None] = mapped_column(String(300))
    layer_depth: Mapped[int | None] = mapped_column(Integer)
    n_layers: Mapped[int] = mapped_column(Integer)
    cluster_index: Mapped[int | None] = mapped_column(Integer)
    cluster_weight: Mapped[float | None] = mapped_column(Float)
    fmap_count: Mapped[int | None] = mapped_column(Integer)
    true_class: Mapped[str] = mapped_column(String(100))
    gold: Mapped[bool] = mapped_column(Boolean)
    inv_run: Mapped[str] = mapped_column(String(300))
    assigned: Mapped[int] = mapped_column(Integer, default=0)


class Participant(Base):
    __tablename__ = "participants"
    # one registration per Prolific id (NULLs, i.e. players without one, stay allowed; migration 0002)
    __table_args__ = (Index("uq_participant_prolific_pid", "prolific_pid", unique=True),)
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    nickname: Mapped[str | None] = mapped_column(String(100))
    prolific_pid: Mapped[str | None] = mapped_column(String(64))
    study_id_param: Mapped[str | None] = mapped_column(String(64))
    session_id_param: Mapped[str | None] = mapped_column(String(64))
    consent_version: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    score: Mapped[int] = mapped_column(Integer, default=0)
    plays: Mapped[int] = mapped_column(Integer, default=0)
    wins: Mapped[int] = mapped_column(Integer, default=0)
    gold_plays: Mapped[int] = mapped_column(Integer, default=0)
    gold_correct: Mapped[int] = mapped_column(Integer, default=0)
    quota: Mapped[int | None] = mapped_column(Integer)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Play(Base):
    __tablename__ = "plays"
    __table_args__ = (UniqueConstraint("participant_id", "round_id", name="uq_play_participant_round"),)
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(10), default="active")
    level: Mapped[int] = mapped_column(Integer, default=0)
    image_token: Mapped[str | None] = mapped_column(String(64), unique=True)
    guessed_class: Mapped[str | None] = mapped_column(String(100))
    correct: Mapped[bool | None] = mapped_column(Boolean)
    score: Mapped[int] = mapped_column(Integer, default=0)
    description: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(35))
    description_screen: Mapped[str | None] = mapped_column(String(10))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PlannedRound(Base):
    """A round reserved for a participant at consent (its slot counted in ``rounds.assigned``), not yet shown."""

    __tablename__ = "planned_rounds"
    __table_args__ = (UniqueConstraint("participant_id", "round_id", name="uq_planned_participant_round"),)
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"))
    position: Mapped[int] = mapped_column(Integer)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("participant_id", "request_id", name="uq_event_request"),)
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    play_id: Mapped[int] = mapped_column(ForeignKey("plays.id"), index=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"))
    round_id: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(10))
    level: Mapped[int] = mapped_column(Integer)
    guessed_class: Mapped[str | None] = mapped_column(String(100))
    text: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(35))
    screen: Mapped[str] = mapped_column(String(10), default="level")
    request_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdminSignout(Base):
    """An admin cookie (by its random id) signed out before its expiry: refused from then on."""

    __tablename__ = "admin_signouts"
    cookie_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    signed_out_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _sqlite_listeners(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        readonly = connection.get_execution_options().get("readonly", False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """Engine for a SQLite file (``sqlite:///PATH``) or PostgreSQL (``postgresql+psycopg://...``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                               pool_size=pool_size, max_overflow=2 * pool_size)
        _sqlite_listeners(engine)
        return engine
    if url.startswith("postgresql"):
        # no overflow: under a burst the request threads wait for one of the pool's connections instead of
        # opening (and, on return, closing) extra ones, which costs more than the requests themselves
        return create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60, pool_recycle=3600)
    raise ValueError(f"unsupported database URL {url.split(':', 1)[0]}: use sqlite:///PATH or postgresql+psycopg://")


def make_sessions(engine: Engine) -> tuple[sessionmaker, sessionmaker]:
    """(writer, reader) session factories. Readers take no write lock on SQLite; on PostgreSQL they run in
    autocommit (each read its own snapshot, no BEGIN and ROLLBACK round trips: the image requests are reads);
    a read that needs one snapshot of several tables (the export) opens its own transaction."""
    writer = sessionmaker(engine, expire_on_commit=False)
    options = {"readonly": True} if engine.dialect.name == "sqlite" else {"isolation_level": "AUTOCOMMIT"}
    reader = sessionmaker(engine.execution_options(**options), expire_on_commit=False)
    return writer, reader


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def schema_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, read with one query (None: no schema yet)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _create_fresh(engine: Engine) -> bool:
    """An empty database gets the newest schema at once: the models' tables and Alembic's version table
    stamped :data:`HEAD` (Alembic's recipe for a database built from scratch, without running every
    migration; tests/study/test_hardening.py checks it equals the migrated schema). False if not empty."""
    with engine.begin() as connection:
        if inspect(connection).get_table_names():
            return False
        Base.metadata.create_all(connection)
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
        connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"), {"head": HEAD})
    return True


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations shipped in ``convlens/study/store/migrations`` up to ``revision``; a
    database already at :data:`HEAD` is left alone and an empty one is created at :data:`HEAD`, both without
    loading Alembic (starting a server stays fast)."""
    if revision in ("head", HEAD) and (schema_revision(engine) == HEAD or _create_fresh(engine)):
        return
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)


def current_revision(engine: Engine) -> tuple[str | None, str]:
    """(database revision, newest shipped revision)."""
    return schema_revision(engine), HEAD

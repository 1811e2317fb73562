"""Open a study for serving: database URL, migrations, rounds loaded into the database, runtime object."""

from __future__ import annotations

import contextlib
import os
import threading

from sqlalchemy import Engine, select

from convlens.study.game.actions import StudyRuntime
from convlens.study.game.assignment import get_policy
from convlens.study.game.plan import resolve_quota
from convlens.study.store.config import (
    RoundSpec,
    StudyConfig,
    StudyFiles,
    check_study_folder,
    load_rounds,
    load_study,
)
from convlens.study.store.db import Round, StudyMeta, current_revision, make_engine, make_sessions, upgrade

__all__ = ["StudyDatabaseError", "database_url", "open_runtime", "prepare_database"]


class StudyDatabaseError(RuntimeError):
    """The database cannot serve this study (other study, old schema, changed rounds)."""


def database_url(study_dir: str | os.PathLike[str], db: str | None = None) -> str:
    """``db`` if given, else the SQLite file ``STUDY_DIR/study.sqlite``."""
    return db or f"sqlite:///{StudyFiles(study_dir).sqlite}"


def _round_row(spec: RoundSpec) -> Round:
    fields = spec.model_dump()
    return Round(id=fields.pop("round_id"), assigned=0, **fields)


def prepare_database(engine: Engine, config: StudyConfig, rounds: list[RoundSpec]) -> None:
    """Migrate to the newest schema, claim the database for this study, load the rounds (once)."""
    upgrade(engine)
    with engine.begin() as connection:
        from sqlalchemy.orm import Session

        session = Session(bind=connection)
        owner = session.get(StudyMeta, "study_id")
        if owner is None:
            session.add_all([StudyMeta(key="study_id", value=config.study_id),
                             StudyMeta(key="study_version", value=config.study_version)])
        elif owner.value != config.study_id:
            raise StudyDatabaseError(f"the database belongs to study {owner.value!r}, not {config.study_id!r}")
        known = set(session.scalars(select(Round.id)))
        wanted = {spec.round_id for spec in rounds}
        if known and known != wanted:
            raise StudyDatabaseError("the database's rounds differ from rounds.json (was the study re-created?)")
        if not known:
            session.add_all(_round_row(spec) for spec in rounds)
        session.flush()


def open_runtime(study_dir: str | os.PathLike[str], db: str | None = None, migrate: bool = True,
                 pool_size: int = 10) -> tuple[StudyRuntime, Engine]:
    """Load the study and connect; ``migrate=False`` (server workers) only checks the schema is current."""
    files = check_study_folder(study_dir)
    config = load_study(files.root)
    rounds = load_rounds(files.root)
    quota = resolve_quota(config, rounds)
    policy = get_policy(config.assignment_policy)
    if not migrate and db is None and not files.sqlite.is_file():
        raise StudyDatabaseError(f"{files.sqlite}: no database: the study has never been served (serve it with "
                                 "`convlens study serve`, or give --db)")
    engine = make_engine(database_url(files.root, db), pool_size=pool_size)
    if migrate:
        prepare_database(engine, config, rounds)
    else:
        current, head = current_revision(engine)
        if current != head:
            raise StudyDatabaseError(f"database schema {current} is not the current {head}: run `convlens study "
                                     "serve` (it migrates before starting workers)")
    writer, reader = make_sessions(engine)
    by_id = {spec.round_id: spec for spec in rounds}
    lock = threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    runtime = StudyRuntime(config, files, by_id, policy, writer, reader, quota, lock)
    return runtime, engine


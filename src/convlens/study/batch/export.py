"""``convlens study export``: every round, play, event and participant, streamed as CSV or JSON Lines.

Writes into the output folder ``study.json`` (study, versions, INV runs, classes, reveal levels, scoring
rule, data dictionary version, export time), ``data_dictionary.json`` / ``.md`` and one file per table
(``rounds``, ``plays``, ``events``, ``participants``) — the contract read by the label pipeline. Rows are
read with ``yield_per`` (server-side cursors on PostgreSQL) and written as they come, so memory does not
grow with the study; all tables come from one snapshot (one read transaction, REPEATABLE READ on
PostgreSQL). Each file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from convlens.study.batch.data_dictionary import DATA_DICTIONARY_VERSION, TABLES, dictionary_markdown
from convlens.study.game.actions import SCORING_RULE
from convlens.study.store.config import StudyConfig
from convlens.study.store.db import Event, Participant, Play, Round

__all__ = ["FORMATS", "export_rows", "export_study", "format_rows", "snapshot_session", "study_metadata"]

FORMATS = ("csv", "jsonl")
BATCH = 1000


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat().replace("+00:00", "Z")


def _rounds(session: Session) -> Iterator[dict[str, Any]]:
    for r in session.scalars(select(Round).order_by(Round.id).execution_options(yield_per=BATCH)):
        yield {"round_id": r.id, "cluster_id": r.cluster_id, "image_id": r.image_id, "image_name": r.image_name,
               "layer": r.layer, "layer_depth": r.layer_depth, "n_layers": r.n_layers, "cluster_index": r.cluster_index,
               "cluster_weight": r.cluster_weight, "fmap_count": r.fmap_count, "true_class": r.true_class,
               "gold": r.gold, "inv_run": r.inv_run}


def _plays(session: Session) -> Iterator[dict[str, Any]]:
    query = (select(Play, Participant.public_id, Round).join(Participant, Play.participant_id == Participant.id)
             .join(Round, Play.round_id == Round.id).order_by(Play.id).execution_options(yield_per=BATCH))
    for play, participant, r in session.execute(query):
        outcome = "abandoned" if play.state == "active" else play.state
        guessed = outcome in ("win", "lose")
        yield {"play_id": play.public_id, "participant_id": participant, "round_id": r.id, "cluster_id": r.cluster_id,
               "image_id": r.image_id, "layer": r.layer, "layer_depth": r.layer_depth, "n_layers": r.n_layers,
               "cluster_index": r.cluster_index, "true_class": r.true_class, "gold": r.gold, "outcome": outcome,
               "level": play.level, "guessed_class": play.guessed_class if guessed else None,
               "correct": play.correct if guessed else None, "description": play.description,
               "language": play.language, "score": play.score, "started_at": _iso(play.started_at),
               "ended_at": _iso(play.ended_at)}


def _events(session: Session) -> Iterator[dict[str, Any]]:
    query = (select(Event, Play.public_id, Participant.public_id, Round.cluster_id)
             .join(Play, Event.play_id == Play.id).join(Participant, Event.participant_id == Participant.id)
             .join(Round, Event.round_id == Round.id).order_by(Event.id).execution_options(yield_per=BATCH))
    for e, play, participant, cluster in session.execute(query):
        yield {"event_id": e.id, "play_id": play, "participant_id": participant, "round_id": e.round_id,
               "cluster_id": cluster, "type": e.type, "level": e.level, "guessed_class": e.guessed_class,
               "text": e.text, "language": e.language, "created_at": _iso(e.created_at)}


def _participants(session: Session) -> Iterator[dict[str, Any]]:
    query = select(Participant).order_by(Participant.id).execution_options(yield_per=BATCH)
    for p in session.scalars(query):
        yield {"participant_id": p.public_id, "nickname": p.nickname, "prolific_pid": p.prolific_pid,
               "study_id_param": p.study_id_param, "session_id_param": p.session_id_param,
               "consent_version": p.consent_version, "created_at": _iso(p.created_at), "plays": p.plays,
               "wins": p.wins, "gold_plays": p.gold_plays, "gold_correct": p.gold_correct}


ROWS = {"rounds": _rounds, "plays": _plays, "events": _events, "participants": _participants}


def export_rows(session: Session, table: str) -> Iterator[dict[str, Any]]:
    """Rows of one exported table, in the data dictionary's column order."""
    if table not in ROWS:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(ROWS)}")
    columns = [c["name"] for c in TABLES[table]]
    for row in ROWS[table](session):
        yield {name: row[name] for name in columns}


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def format_rows(rows: Iterator[dict[str, Any]], table: str, fmt: str) -> Iterator[str]:
    """CSV (header, RFC 4180 quoting, empty = null, booleans true/false) or JSON Lines, in chunks."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use csv or jsonl")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if fmt == "csv":
        writer.writerow([c["name"] for c in TABLES[table]])
    for count, row in enumerate(rows, 1):
        if fmt == "csv":
            writer.writerow([_csv_value(v) for v in row.values()])
        else:
            buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
        if count % BATCH == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def study_metadata(config: StudyConfig, backend: str) -> dict[str, Any]:
    """``study.json`` of an export."""
    import convlens

    return {
        "study_id": config.study_id, "title": config.title, "study_version": config.study_version,
        "consent_version": config.consent_version, "convlens_version": convlens.__version__,
        "created_with_convlens": config.convlens_version, "export_time": _iso(datetime.now(UTC)),
        "inv_runs": [run.model_dump() for run in config.inv_runs], "layer_choice": config.layer_choice,
        "classes": config.classes, "languages": config.languages,
        "reveal_levels": {str(i): q for i, q in enumerate(config.reveal_percentages)},
        "gold_reveal_levels": {str(i): q for i, q in enumerate(config.gold_percentages)},
        "scoring_rule": SCORING_RULE, "plays_per_round": config.plays_per_round,
        "rounds_per_player": config.rounds_per_player, "assignment_policy": config.assignment_policy,
        "data_dictionary_version": DATA_DICTIONARY_VERSION, "database_backend": backend,
    }


def snapshot_session(engine: Engine) -> Session:
    """A session whose transaction sees one snapshot: read-only on SQLite, REPEATABLE READ on PostgreSQL."""
    bind = engine.execution_options(readonly=True)
    if engine.dialect.name == "postgresql":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    return Session(bind=bind)


def export_study(engine: Engine, config: StudyConfig, out: str | os.PathLike[str], fmt: str = "csv") -> list[Path]:
    """Write the export into ``out``; returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use csv or jsonl")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, chunks: Iterator[str]) -> None:
        tmp = out / f".{name}.tmp"
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            for chunk in chunks:
                handle.write(chunk)
        tmp.replace(out / name)
        written.append(out / name)

    write("study.json", iter([json.dumps(study_metadata(config, engine.dialect.name), indent=2)]))
    write("data_dictionary.json", iter([json.dumps({"version": DATA_DICTIONARY_VERSION, "tables": TABLES}, indent=2)]))
    write("data_dictionary.md", iter([dictionary_markdown()]))
    with snapshot_session(engine) as session, session.begin():
        for table in ROWS:
            write(f"{table}.{fmt}", format_rows(export_rows(session, table), table, fmt))
    return written

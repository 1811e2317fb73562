"""``convlens study export``: every round, play, event and participant, streamed as CSV or JSON Lines.

Writes one output folder as a whole (:class:`convlens.core.outputs.OutputFolder`: built aside, renamed
into place, never over a folder holding anything it did not write): ``study.json`` (study, versions, INV
runs, classes, reveal levels, quota, scoring rule, data dictionary version, export time, how CSV cells
were written), ``data_dictionary.json`` / ``.md``, one file per table (``rounds``, ``plays``, ``events``,
``participants``) — the contract read by the label pipeline — and ``manifest.json`` with every file's size
and SHA-256. Rows are read with ``yield_per`` (server-side cursors on PostgreSQL) and written as they come,
so memory does not grow with the study; all tables come from one snapshot (one read transaction,
REPEATABLE READ on PostgreSQL).

Spreadsheet safety: in CSV every text cell — participant text above all (:data:`PARTICIPANT_TEXT`) — is
neutralised (:func:`convlens.core.csv_cells.neutralise`: a cell a spreadsheet would run as a formula, or that
starts with a quote, gets a leading quote; :func:`convlens.core.csv_cells.restore` inverts it exactly, and
the label pipeline's reader does so for every text cell) unless ``raw_csv``; ``study.json`` and the manifest
say which (``"csv_cells": "neutralised" | "raw"``). Numbers, booleans and times never start with those
characters. JSON Lines is always exact.
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

from convlens.core.csv_cells import neutralise as neutralise_cell
from convlens.core.outputs import FolderKind, OutputFolder
from convlens.study.batch.data_dictionary import DATA_DICTIONARY_VERSION, PARTICIPANT_TEXT, TABLES, dictionary_markdown
from convlens.study.game.actions import SCORING_RULE
from convlens.study.game.plan import Quota, resolve_quota
from convlens.study.store.config import RoundSpec, StudyConfig
from convlens.study.store.db import Event, Participant, Play, Round

__all__ = ["EXPORT_FOLDER", "FORMATS", "export_rows", "export_study", "format_rows", "snapshot_session",
           "study_metadata"]

FORMATS = ("csv", "jsonl")
BATCH = 1000
_JSON = json.JSONEncoder(ensure_ascii=False).encode  # one encoder (json.dumps with options builds one per call)
EXPORT_FOLDER = FolderKind(
    command="convlens study export", manifest="manifest.json", format="convlens-study-export",
    names=frozenset({"manifest.json", "study.json", "data_dictionary.json", "data_dictionary.md",
                     *(f"{table}.{fmt}" for table in TABLES for fmt in FORMATS)}),
)


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with ``Z`` and microseconds (SQLite hands back naive UTC times, PostgreSQL aware ones)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def _rounds(session: Session) -> Iterator[dict[str, Any]]:
    for r in session.scalars(select(Round).order_by(Round.id).execution_options(yield_per=BATCH)):
        yield {"round_id": r.id, "cluster_id": r.cluster_id, "image_id": r.image_id, "image_name": r.image_name,
               "layer": r.layer, "layer_depth": r.layer_depth, "n_layers": r.n_layers, "cluster_index": r.cluster_index,
               "cluster_weight": r.cluster_weight, "fmap_count": r.fmap_count, "true_class": r.true_class,
               "gold": r.gold, "inv_run": r.inv_run}


def _plays(session: Session) -> Iterator[dict[str, Any]]:
    """Every play that was shown (rounds planned for a participant are not plays until they start)."""
    query = (select(Play.public_id, Participant.public_id, Play.position, Round.id, Round.cluster_id, Round.image_id,
                    Round.layer, Round.layer_depth, Round.n_layers, Round.cluster_index, Round.true_class,
                    Round.gold, Play.state, Play.level, Play.guessed_class, Play.correct, Play.description,
                    Play.language, Play.description_screen, Play.score, Play.started_at, Play.ended_at)
             .join(Participant, Play.participant_id == Participant.id).join(Round, Play.round_id == Round.id)
             .order_by(Play.id).execution_options(yield_per=BATCH))
    for (play, participant, position, round_id, cluster, image, layer, depth, n_layers, index, true_class, gold,
         state, level, guessed_class, correct, description, language, screen, score, started,
         ended) in session.execute(query):
        outcome = {"active": "abandoned", "guessed": "win" if correct else "lose"}.get(state, state)
        guessed = outcome in ("win", "lose")
        yield {"play_id": play, "participant_id": participant, "position": position, "round_id": round_id,
               "cluster_id": cluster, "image_id": image, "layer": layer, "layer_depth": depth, "n_layers": n_layers,
               "cluster_index": index, "true_class": true_class, "gold": gold, "outcome": outcome, "level": level,
               "guessed_class": guessed_class if guessed else None, "correct": correct if guessed else None,
               "description": description, "language": language, "description_screen": screen,
               "score": score if guessed else 0, "started_at": _iso(started), "ended_at": _iso(ended)}


def _events(session: Session) -> Iterator[dict[str, Any]]:
    query = (select(Event.id, Play.public_id, Participant.public_id, Event.round_id, Round.cluster_id, Event.type,
                    Event.level, Event.screen, Event.guessed_class, Event.text, Event.language, Event.created_at)
             .join(Play, Event.play_id == Play.id).join(Participant, Event.participant_id == Participant.id)
             .join(Round, Event.round_id == Round.id).order_by(Event.id).execution_options(yield_per=BATCH))
    names = ("event_id", "play_id", "participant_id", "round_id", "cluster_id", "type", "level", "screen",
             "guessed_class", "text", "language")
    for row in session.execute(query):
        record = dict(zip(names, row, strict=False))
        record["created_at"] = _iso(row[-1])
        yield record


def _participants(session: Session) -> Iterator[dict[str, Any]]:
    query = select(Participant).order_by(Participant.id).execution_options(yield_per=BATCH)
    for p in session.scalars(query):
        yield {"participant_id": p.public_id, "nickname": p.nickname, "prolific_pid": p.prolific_pid,
               "study_id_param": p.study_id_param, "session_id_param": p.session_id_param,
               "consent_version": p.consent_version, "created_at": _iso(p.created_at), "quota": p.quota,
               "plays": p.plays, "completed": p.completed_at is not None, "completed_at": _iso(p.completed_at),
               "wins": p.wins, "gold_plays": p.gold_plays, "gold_correct": p.gold_correct,
               "gold_accuracy": round(p.gold_correct / p.gold_plays, 6) if p.gold_plays else None}


ROWS = {"rounds": _rounds, "plays": _plays, "events": _events, "participants": _participants}


def export_rows(session: Session, table: str) -> Iterator[dict[str, Any]]:
    """Rows of one exported table, in the data dictionary's column order (checked on the first row)."""
    if table not in ROWS:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(ROWS)}")
    columns = [c["name"] for c in TABLES[table]]
    rows = ROWS[table](session)
    for row in rows:
        if list(row) != columns:
            raise RuntimeError(f"{table}: the export's columns {list(row)} differ from the data dictionary's")
        yield row
        yield from rows


def format_rows(rows: Iterator[dict[str, Any]], table: str, fmt: str, *, neutralise: bool = True) -> Iterator[str]:
    """CSV (header, RFC 4180 quoting, empty = null, booleans true/false, every text cell neutralised unless
    ``neutralise`` is false) or JSON Lines (exact), in chunks."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use csv or jsonl")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [c["name"] for c in TABLES[table]]
    guard = neutralise_cell if neutralise else str
    if fmt == "csv":
        writer.writerow(columns)
    for count, row in enumerate(rows, 1):
        if fmt == "csv":  # null -> "", booleans true/false (inline: this runs for every cell of the study)
            writer.writerow(["" if v is None else ("true" if v else "false") if v.__class__ is bool
                             else guard(v) if v.__class__ is str else v for v in row.values()])
        else:
            buffer.write(_JSON(row) + "\n")
        if count % BATCH == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def study_metadata(config: StudyConfig, backend: str, quota: Quota | None = None,
                   csv_cells: str = "neutralised") -> dict[str, Any]:
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
        "quota": quota.total if quota else config.quota, "gold_per_participant": quota.gold if quota else None,
        "gold_rate": config.gold_rate, "lease_seconds": config.lease_seconds,
        "one_round_per_image": config.one_round_per_image, "assignment_policy": config.assignment_policy,
        "description_flow": "before-answer (events.screen / plays.description_screen = level; rows marked "
                            "answer were written after the answer was shown, by convlens before this flow)",
        "csv_cells": csv_cells, "participant_text": {t: list(c) for t, c in PARTICIPANT_TEXT.items()},
        "data_dictionary_version": DATA_DICTIONARY_VERSION, "database_backend": backend,
    }


def snapshot_session(engine: Engine) -> Session:
    """A session whose transaction sees one snapshot: read-only on SQLite, REPEATABLE READ on PostgreSQL."""
    bind = engine.execution_options(readonly=True)
    if engine.dialect.name == "postgresql":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    return Session(bind=bind)


def _quota(session: Session, config: StudyConfig) -> Quota | None:
    specs = [RoundSpec(round_id=r.id, cluster_id=r.cluster_id, image_id=r.image_id, image_name=r.image_name,
                       layer=r.layer, layer_depth=r.layer_depth, n_layers=r.n_layers, cluster_index=r.cluster_index,
                       cluster_weight=r.cluster_weight, fmap_count=r.fmap_count, true_class=r.true_class,
                       gold=r.gold, inv_run=r.inv_run) for r in session.scalars(select(Round))]
    try:
        return resolve_quota(config, specs)
    except ValueError:
        return None


def export_study(engine: Engine, config: StudyConfig, out: str | os.PathLike[str], fmt: str = "csv", *,
                 raw_csv: bool = False) -> list[Path]:
    """Write the export folder ``out`` as a whole; returns the files written. Raises
    :class:`convlens.core.outputs.OutputFolderError` when ``out`` cannot be this export's folder."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use csv or jsonl")
    cells = "raw" if raw_csv or fmt == "jsonl" else "neutralised"
    with OutputFolder(out, EXPORT_FOLDER) as folder, snapshot_session(engine) as session, session.begin():
        names = ["study.json", "data_dictionary.json", "data_dictionary.md", *(f"{t}.{fmt}" for t in ROWS)]

        def write(name: str, chunks: Iterator[str]) -> None:
            with (folder.path / name).open("w", encoding="utf-8", newline="") as handle:
                for chunk in chunks:
                    handle.write(chunk)

        metadata = study_metadata(config, engine.dialect.name, _quota(session, config), cells)
        write("study.json", iter([json.dumps(metadata, indent=2)]))
        write("data_dictionary.json", iter([json.dumps({"version": DATA_DICTIONARY_VERSION, "tables": TABLES},
                                                       indent=2)]))
        write("data_dictionary.md", iter([dictionary_markdown()]))
        counts = {}
        for table in ROWS:
            rows = export_rows(session, table)
            counted = _Counted(rows)
            write(f"{table}.{fmt}", format_rows(counted, table, fmt, neutralise=not raw_csv))
            counts[table] = counted.count
        folder.seal({"study_id": config.study_id, "export_time": metadata["export_time"], "table_format": fmt,
                     "csv_cells": cells, "rows": counts})
    return [Path(out) / name for name in [*names, EXPORT_FOLDER.manifest]]


def default_export_folder(study_dir: str | os.PathLike[str], fmt: str) -> Path:
    """``STUDY_DIR/exports/<UTC time>-<format>``: where an export goes when no folder is given."""
    return Path(study_dir) / "exports" / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{fmt}"


def export_study_folder(study_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                        fmt: str = "csv", *, db: str | None = None, raw_csv: bool = False) -> list[Path]:
    """``convlens study export`` from Python: open the study in ``study_dir`` (its SQLite file, or ``db``),
    check ``out`` (default :func:`default_export_folder`) before anything is read, and write the export there.
    Raises ``ValueError``, ``OSError``, :class:`~convlens.core.outputs.OutputFolderError`,
    :class:`~convlens.study.game.opening.StudyDatabaseError` or SQLAlchemy's errors, writing nothing."""
    from convlens.core.outputs import check_output_folder
    from convlens.study.game.opening import open_runtime

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use csv or jsonl")
    target = Path(out) if out is not None else default_export_folder(study_dir, fmt)
    check_output_folder(target, EXPORT_FOLDER)
    runtime, engine = open_runtime(study_dir, db, migrate=False)
    try:
        return export_study(engine, runtime.config, target, fmt, raw_csv=raw_csv)
    finally:
        engine.dispose()


class _Counted:
    """An iterator that counts what passed through it (rows per table, recorded in the manifest)."""

    def __init__(self, rows: Iterator[dict[str, Any]]) -> None:
        self.rows, self.count = rows, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            self.count += 1
            yield row

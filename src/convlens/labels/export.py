"""Read a Deep Reveal study export (the contract between the study server and the label pipeline).

``convlens study export STUDY_DIR --format csv|jsonl --out DIR`` writes ``study.json``,
``rounds.csv|jsonl`` and ``plays.csv|jsonl`` (plus events and participants, not read here). This module
reads those three into typed records. It never drops a row silently: a play row that cannot be parsed
(unknown outcome, level outside 0..5, missing class, ...) becomes an :class:`InvalidRow` that the audit
trail lists with its reason; a missing file or column raises :class:`ExportError` with one clear message.

Columns read (see the study's ``data_dictionary.json`` for their meaning):

* ``plays``: play_id, participant_id, round_id, cluster_id, image_id, layer, layer_depth, n_layers,
  cluster_index, true_class, gold, outcome (win | lose | resign | abandoned), level (reveal-level index
  0..5), guessed_class, correct, description, language.
* ``rounds``: round_id, cluster_id, image_id, image_name, layer, layer_depth, n_layers, cluster_index,
  cluster_weight (percent of the layer), fmap_count, true_class, gold, inv_run.

Spreadsheet safety: an export whose ``study.json`` says ``"csv_cells": "neutralised"`` wrote every text
cell of its CSV tables through :func:`convlens.core.csv_cells.neutralise` (a cell starting with ``=``,
``+``, ``-``, ``@``, a tab, a carriage return or a quote got a leading ``'``); this reader restores the
exact text of every cell (:func:`~convlens.core.csv_cells.restore`; a number never starts with a quote).
``"raw"``, or no ``csv_cells`` (an older export), and JSONL tables are read as they are.

A STUDY_DIR is exported first by the command line (``convlens labels``), which may import the study
package; this module, below it in the package layers, reads export folders only.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.core.csv_cells import restore

__all__ = [
    "LEVELS",
    "OUTCOMES",
    "ExportError",
    "InvalidRow",
    "Play",
    "Round",
    "StudyExport",
    "is_export",
    "iter_export_table",
    "optional_int",
    "read_export",
    "read_study_json",
]

OUTCOMES = ("win", "lose", "resign", "abandoned")
# reveal levels 2, 4.5, 8, 13, 20, 30 % (the authors' ``heatmap_utils.py`` stores the index as "percentile")
LEVELS = range(6)
PLAY_COLUMNS = (
    "play_id", "participant_id", "round_id", "cluster_id", "image_id", "layer", "true_class", "gold",
    "outcome", "level", "guessed_class", "description", "language",
)
ROUND_COLUMNS = ("round_id", "cluster_id", "image_id", "layer", "layer_depth", "true_class", "gold")
CSV_CELLS = ("neutralised", "raw")  # study.json "csv_cells"; absent: raw
_TRUE = {"true", "t", "1", "yes", "y"}
_FALSE = {"false", "f", "0", "no", "n"}


class ExportError(ValueError):
    """The input is not a readable study export (one clear message; nothing is written)."""


@dataclass(frozen=True)
class Round:
    """One round: one image x layer x INV cluster (or a gold round)."""

    round_id: str
    cluster_id: str
    image_id: str
    image_name: str
    layer: str
    layer_depth: int | None
    n_layers: int | None
    cluster_index: int | None
    cluster_weight: float | None
    fmap_count: int | None
    true_class: str
    gold: bool
    inv_run: str


@dataclass(frozen=True)
class Play:
    """One participant playing one round (one row of ``plays``)."""

    play_id: str
    participant_id: str
    round_id: str
    cluster_id: str
    image_id: str
    layer: str
    layer_depth: int | None
    true_class: str
    gold: bool
    outcome: str
    level: int
    guessed_class: str
    correct: bool | None
    description: str
    language: str


@dataclass(frozen=True)
class InvalidRow:
    """A ``plays`` row that could not be used, kept with its reason for the audit trail."""

    row_number: int
    reason: str
    raw: dict[str, str]


@dataclass
class StudyExport:
    """The parts of an export the label pipeline reads."""

    directory: Path
    study: dict[str, Any]
    rounds: dict[str, Round]
    plays: list[Play]
    invalid: list[InvalidRow] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """The study's classes (``study.json``), then any other class seen in rounds or plays."""
        named = [_class_name(c) for c in self.study.get("classes") or []]
        seen = [r.true_class for r in self.rounds.values()] + [p.true_class for p in self.plays]
        seen += [p.guessed_class for p in self.plays if p.guessed_class]
        return list(dict.fromkeys([c for c in named + seen if c]))

    def inv_runs(self, base: Path | None = None) -> dict[str, Path]:
        """INV run folder name -> path, from ``study.json``; a relative path is taken against ``base``
        (default: the export's folder), or against the working folder where only that one exists."""
        runs: dict[str, Path] = {}
        entries = self.study.get("inv_runs") or []
        if isinstance(entries, dict):
            entries = [{"name": k, **(v if isinstance(v, dict) else {"path": v})} for k, v in entries.items()]
        for entry in entries:
            path_text = entry if isinstance(entry, str) else entry.get("path")
            if not path_text:
                continue
            path = Path(path_text)
            if not path.is_absolute():
                relative = (base or self.directory) / path
                path = (relative if relative.exists() or not path.exists() else path).resolve()
            name = entry.get("name") if isinstance(entry, dict) else None
            runs[str(name or Path(path_text).name)] = path
        return runs


def _class_name(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("name") or entry.get("class") or "")
    return str(entry)


def _iter_table(directory: Path, table: str, neutralised: bool) -> tuple[Path, Iterator[dict[str, str]]]:
    csv_path, jsonl_path = directory / f"{table}.csv", directory / f"{table}.jsonl"
    if csv_path.is_file():
        return csv_path, _iter_csv(csv_path, neutralised)
    if jsonl_path.is_file():
        return jsonl_path, _iter_jsonl(jsonl_path)
    raise ExportError(f"{directory}: no {table}.csv or {table}.jsonl (is this a `convlens study export` folder?)")


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> ExportError:
    byte = exc.object[exc.start:exc.start + 1].hex()
    return ExportError(f"{path}: not UTF-8 text (a byte 0x{byte} cannot be read); export the study again or save "
                       "the file as UTF-8")


def _iter_csv(path: Path, neutralised: bool) -> Iterator[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long descriptions are reported, not a crash
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if neutralised:
                    row = {k: restore(v) if isinstance(v, str) else v for k, v in row.items()}
                yield row
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except csv.Error as exc:
        raise ExportError(f"{path}: line {reader.line_num}: not readable as CSV ({exc})") from None


def _iter_jsonl(path: Path) -> Iterator[dict[str, str]]:
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ExportError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise ExportError(f"{path}:{number}: expected one JSON object per line")
                yield {k: _text(v) for k, v in record.items()}
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _text(value: Any) -> str:
    """A JSON value as the CSV export writes it: null -> '', booleans true/false."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_columns(path: Path, row: dict[str, str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in row]
    if missing:
        raise ExportError(f"{path}: missing column(s) {', '.join(missing)} (see the study's data dictionary)")


def optional_int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(float(text)) if text else None


def _optional_float(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def _bool(text: str | None, column: str) -> bool | None:
    value = (text or "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{column}={text!r} is not true/false")


def _parse_round(row: dict[str, str]) -> Round:
    return Round(
        round_id=row["round_id"].strip(), cluster_id=row["cluster_id"].strip(), image_id=row["image_id"].strip(),
        image_name=row.get("image_name", "").strip(), layer=row["layer"].strip(),
        layer_depth=optional_int(row.get("layer_depth")), n_layers=optional_int(row.get("n_layers")),
        cluster_index=optional_int(row.get("cluster_index")),
        cluster_weight=_optional_float(row.get("cluster_weight")), fmap_count=optional_int(row.get("fmap_count")),
        true_class=row["true_class"].strip(), gold=bool(_bool(row.get("gold"), "gold")),
        inv_run=row.get("inv_run", "").strip(),
    )


def _parse_play(row: dict[str, str]) -> Play:
    """One plays row as a :class:`Play`; ``ValueError`` with the reason when it cannot be used."""
    outcome = row["outcome"].strip().lower()
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {row['outcome']!r} (expected one of {', '.join(OUTCOMES)})")
    level_text = row["level"].strip()
    try:
        level = int(float(level_text))
    except ValueError:
        raise ValueError(f"level {level_text!r} is not a reveal-level index 0..5") from None
    if level not in LEVELS:
        raise ValueError(f"level {level} is outside the reveal-level indices 0..5")
    true_class, guessed = row["true_class"].strip(), row["guessed_class"].strip()
    if not true_class:
        raise ValueError("no true_class")
    if outcome in ("win", "lose") and not guessed:
        raise ValueError(f"outcome {outcome} without guessed_class")
    correct = _bool(row.get("correct"), "correct")
    if outcome in ("win", "lose"):
        correct = guessed == true_class if correct is None else correct
        if correct != (outcome == "win"):
            raise ValueError(f"outcome {outcome} contradicts correct={row.get('correct')!r}")
    return Play(
        play_id=row["play_id"].strip(), participant_id=row["participant_id"].strip(),
        round_id=row["round_id"].strip(), cluster_id=row["cluster_id"].strip(), image_id=row["image_id"].strip(),
        layer=row["layer"].strip(), layer_depth=optional_int(row.get("layer_depth")), true_class=true_class,
        gold=bool(_bool(row.get("gold"), "gold")), outcome=outcome, level=level, guessed_class=guessed,
        correct=correct, description=row.get("description") or "", language=(row.get("language") or "").strip(),
    )


def read_study_json(directory: Path) -> dict[str, Any]:
    """An export folder's ``study.json`` (``{}`` when absent), checked: a JSON object with a known
    ``csv_cells`` (``"neutralised"``: text cells went through :func:`convlens.core.csv_cells.neutralise`)."""
    study_path = directory / "study.json"
    try:
        study = json.loads(study_path.read_text(encoding="utf-8")) if study_path.is_file() else {}
    except UnicodeDecodeError as exc:
        raise _not_utf8(study_path, exc) from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{study_path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(study, dict):
        raise ExportError(f"{study_path}: expected a JSON object")
    cells = study.get("csv_cells", "raw")
    if cells not in CSV_CELLS:
        raise ExportError(f"{study_path}: csv_cells {cells!r} is not one of {', '.join(CSV_CELLS)}")
    return study


def iter_export_table(directory: str | Path, table: str) -> tuple[Path, Iterator[dict[str, str]]]:
    """The file of ``table`` (``rounds``, ``plays``, ``participants``, ...) in an export folder and its rows,
    participant text restored when the export's CSV cells are neutralised."""
    directory = Path(directory)
    return _iter_table(directory, table, read_study_json(directory).get("csv_cells") == "neutralised")


def read_export(directory: str | Path) -> StudyExport:
    """Read ``study.json``, ``rounds`` and ``plays`` of an export folder (CSV or JSONL)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: not a folder")
    study = read_study_json(directory)
    neutralised = study.get("csv_cells", "raw") == "neutralised"
    rounds: dict[str, Round] = {}
    path, rows = _iter_table(directory, "rounds", neutralised)
    for number, row in enumerate(rows, start=2):
        _check_columns(path, row, ROUND_COLUMNS)
        try:
            parsed = _parse_round(row)
        except ValueError as exc:
            raise ExportError(f"{path}: row {number}: {exc}") from exc
        rounds[parsed.round_id] = parsed
    plays: list[Play] = []
    invalid: list[InvalidRow] = []
    path, rows = _iter_table(directory, "plays", neutralised)
    for number, row in enumerate(rows, start=2):
        _check_columns(path, row, PLAY_COLUMNS)
        try:
            plays.append(_parse_play(row))
        except ValueError as exc:
            invalid.append(InvalidRow(number, f"invalid row: {exc}", dict(row)))
    return StudyExport(directory=directory, study=study, rounds=rounds, plays=plays, invalid=invalid)


def is_export(directory: str | Path) -> bool:
    """True if ``directory`` holds a plays table (``plays.csv`` or ``plays.jsonl``)."""
    return any((Path(directory) / f"plays.{ext}").is_file() for ext in ("csv", "jsonl"))

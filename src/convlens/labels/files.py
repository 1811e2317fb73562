"""The files of a ``convlens labels`` run: written by :func:`write_labels`, read by :func:`read_labels`.

A labels folder holds (all CSV UTF-8 with a header row; lists inside a cell are joined with ``"; "``):

* ``labels.json`` — manifest: format/version, study, INV runs, embedder (name, source, weights
  SHA-256, sentence-transformers version), translator, settings, stop-word list hash, library
  versions, counts per status and per exclusion reason, per class the text clustering (number of
  distinct descriptions, k, rule, silhouette per k, labels), timings;
* ``audit.csv`` — one row per play: raw description -> translation -> cleaned text -> text cluster ->
  representative -> label -> score of that label in its cluster, or the status and reason it was not
  used (see :mod:`convlens.labels.pipeline`);
* ``text_clusters.csv`` — per class and text cluster: descriptions with their counts, candidates,
  representative word and its summed similarity, lemma, label;
* ``clusters.csv`` — per INV cluster: weight, map count, wins, losses, resigns, level, best labels, group;
* ``label_scores.csv`` — per INV cluster and label: frequency, mean level, right/wrong games, score, best;
* ``groups.csv`` / ``group_labels.csv`` — merged groups (``merge`` = ``best`` for clusters sharing a best
  label, ``full`` for a whole layer) and each group's label strengths, strongest first;
* ``agreement.csv`` — Krippendorff's alpha per class and per cluster (see :mod:`convlens.labels.agreement`).

The folder is written as a whole (:class:`~convlens.core.outputs.OutputFolder`: built aside, renamed into
place, only over a folder ``convlens labels`` wrote) and ``labels.json`` records every file's size and
SHA-256, which :func:`read_labels` checks, so a folder cut short or half replaced is named, never read.

Spreadsheet safety: participants write the descriptions, so by default every text cell of every CSV is
neutralised the OWASP way (:func:`convlens.core.csv_cells.neutralise`: a cell starting with ``=``, ``+``,
``-``, ``@``, a tab, a carriage return or a quote gets a leading ``'``), and ``labels.json`` says so
(``"csv_cells": "neutralised"``); :func:`read_labels` restores the exact text. ``csv_cells: "raw"``
(``convlens labels --raw-csv``) writes the text as it is. Numbers are never changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convlens.core.csv_cells import neutralise, restore
from convlens.core.outputs import FolderKind, OutputFolder, OutputFolderError, verify_output_folder
from convlens.labels.records import AuditRow, LabelsResult
from convlens.labels.scores import ClusterGroup
from convlens.labels.text import load_stop_words

__all__ = ["CSV_CELLS", "FORMAT", "FORMAT_VERSION", "GLOBAL_FOLDER", "LABELS_FOLDER", "LabelsFolder", "read_labels",
           "read_table", "write_labels"]

FORMAT = "convlens-labels"
FORMAT_VERSION = 2  # 2: sealed manifest (sizes and SHA-256 of every file), neutralised CSV cells
MANIFEST = "labels.json"
TABLES = ("audit", "text_clusters", "clusters", "label_scores", "groups", "group_labels", "agreement")
CSV_CELLS = ("neutralised", "raw")
LABELS_FOLDER = FolderKind(
    command="convlens labels", manifest=MANIFEST, format=FORMAT,
    names=frozenset({MANIFEST, *(f"{name}.csv" for name in TABLES)}),
    extra=frozenset({"tcav.csv", "tcav.previous.csv", "tcav.placed.json"}),  # what `convlens tcav` places here
)
# the folder of `convlens global` (written by convlens.reports.global_report; its class folders, one per class,
# are listed in the sealed global.json); here so that every reader below the reports can check it
GLOBAL_FOLDER = FolderKind(command="convlens global", manifest="global.json", format="convlens-global",
                           names=frozenset({"global.json", "index.html", "trends.csv", "slopes.csv"}))
SEP = "; "
CLUSTER_COLUMNS = (
    "cluster_id", "class", "image_id", "image_name", "layer", "layer_depth", "n_layers", "cluster_index",
    "weight", "fmap_count", "wins", "losses", "resigns", "level", "n_labels", "best_labels", "group_id", "inv_run",
)
SCORE_COLUMNS = (
    "cluster_id", "class", "image_id", "layer", "layer_depth", "n_layers", "label", "frequency", "mean_level",
    "n_correct", "n_wrong", "score", "best",
)
GROUP_COLUMNS = (
    "group_id", "merge", "class", "image_id", "layer", "layer_depth", "n_layers", "cluster_ids", "weight",
    "fmap_count", "wins", "losses", "resigns", "shared_labels", "top_labels", "inv_run",
)


def _cell(value: Any, neutralised: bool) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.10g}"
    return neutralise(value) if neutralised and isinstance(value, str) else value


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, neutralised: bool = False) -> str:
    """CSV text with a header row; None as an empty cell, floats with 10 significant digits; with
    ``neutralised``, every text (``str``) cell spreadsheet-safe (:func:`~convlens.core.csv_cells.neutralise`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(v, neutralised) for v in row])
    return buffer.getvalue()


VERSIONED = ("convlens", "numpy", "scipy", "scikit-learn", "sentence-transformers", "simplemma", "krippendorff",
             "rapidfuzz")


def _class_summary(result: LabelsResult) -> dict[str, Any]:
    summary = {}
    for name, labelling in result.labellings.items():
        summary[name] = {
            "descriptions": sum(labelling.counts), "distinct": len(labelling.texts), "text_clusters": labelling.k,
            "rule": labelling.rule, "silhouettes": {str(k): v for k, v in labelling.silhouettes.items()},
            "labels": sorted({c.label for c in labelling.clusters if c.label}),
        }
    empty = {"descriptions": 0, "distinct": 0, "text_clusters": 0, "rule": "no correct-guess descriptions",
             "silhouettes": {}, "labels": []}
    for cluster in result.clusters:
        summary.setdefault(cluster.class_name, dict(empty))
    return summary


def _manifest(result: LabelsResult) -> dict[str, Any]:
    from convlens.core.provenance import package_versions

    stop_words = sorted(load_stop_words())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(result.source),
        "study": result.export.study,
        "inv_runs": {name: str(path) for name, path in result.inv_runs.items()},
        "embedder": result.embedder,
        "translator": result.translator,
        "settings": {**asdict(result.settings),
                     "class_aliases": {k: list(v) for k, v in result.settings.class_aliases.items()}},
        "stop_words": {"count": len(stop_words), "sha256": hashlib.sha256("\n".join(stop_words).encode()).hexdigest()},
        "versions": package_versions(VERSIONED),
        "counts": {"plays": len(result.audit), "status": result.status_counts(), "excluded": result.reason_counts(),
                   "description_not_used": result.unused_counts()},
        "classes": _class_summary(result),
        "text_rules": result.text_rules(),
        "timings": result.timings,
    }


def _group_rows(groups: Sequence[ClusterGroup]) -> Iterable[list[Any]]:
    for g in groups:
        top = SEP.join(f"{label}={strength:.6g}" for label, strength in g.strengths[:10])
        yield [g.group_id, g.merge, g.first.class_name, g.first.image_id, g.first.layer, g.first.layer_depth,
               g.first.n_layers, SEP.join(c.cluster_id for c in g.members), g.weight, g.fmap_count, g.wins, g.losses,
               g.resigns, SEP.join(g.shared_labels), top, g.first.inv_run]


def _text_cluster_rows(result: LabelsResult) -> Iterable[list[Any]]:
    for name, labelling in result.labellings.items():
        for c in labelling.clusters:
            texts = SEP.join(f"{t} (x{n})" for t, n in zip(c.texts, c.counts, strict=True))
            yield [name, c.index, len(c.texts), c.frequency, texts, SEP.join(c.candidates), c.representative,
                   c.representative_score, c.lemma, c.label]


def write_labels(result: LabelsResult, out: str | Path, *, raw_csv: bool = False) -> Path:
    """Write the labels folder ``out`` as a whole (see the module docstring; ``raw_csv`` leaves text cells
    as they are) and return its manifest's path. Raises :class:`~convlens.core.outputs.OutputFolderError`
    (nothing written) when ``out`` is a file or a folder holding anything ``convlens labels`` did not write."""
    out = Path(out)

    def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
        return csv_text(columns, rows, neutralised=not raw_csv)

    group_of = {c.cluster_id: g.group_id for g in result.groups for c in g.members}
    audit_columns = [f.name for f in fields(AuditRow)]
    files = {
        "audit.csv": table(audit_columns, ([getattr(r, c) for c in audit_columns] for r in result.audit)),
        "text_clusters.csv": table(
            ("class", "text_cluster", "n_distinct", "n_descriptions", "descriptions", "candidates", "representative",
             "representative_score", "lemma", "label"), _text_cluster_rows(result)),
        "clusters.csv": table(CLUSTER_COLUMNS, (
            [c.cluster_id, c.class_name, c.image_id, c.image_name, c.layer, c.layer_depth, c.n_layers, c.cluster_index,
             c.weight, c.fmap_count, c.wins, c.losses, c.resigns, c.level, sum(s.frequency for s in c.scores.values()),
             SEP.join(c.best_labels), group_of.get(c.cluster_id, ""), c.inv_run] for c in result.clusters)),
        "label_scores.csv": table(SCORE_COLUMNS, (
            [c.cluster_id, c.class_name, c.image_id, c.layer, c.layer_depth, c.n_layers, s.label, s.frequency,
             s.mean_level, s.n_correct, s.n_wrong, s.score, s.label in c.best_labels]
            for c in result.clusters for s in sorted(c.scores.values(), key=lambda s: (-s.score, s.label)))),
        "groups.csv": table(GROUP_COLUMNS, _group_rows([*result.groups, *result.full_groups])),
        "group_labels.csv": table(("group_id", "merge", "rank", "label", "strength"), (
            [g.group_id, g.merge, rank, label, strength]
            for g in [*result.groups, *result.full_groups] for rank, (label, strength) in enumerate(g.strengths, 1))),
        "agreement.csv": table([f.name for f in fields(result.agreement[0])] if result.agreement else ["scope"],
                                   (list(asdict(a).values()) for a in result.agreement)),
    }
    with OutputFolder(out, LABELS_FOLDER) as folder:
        for name, text in files.items():
            (folder.path / name).write_text(text, encoding="utf-8")
        folder.seal(_manifest(result) | {"csv_cells": "raw" if raw_csv else "neutralised"})
    return out / MANIFEST


class LabelsFolder:
    """A labels folder read back: the manifest and the tables as lists of dicts (strings, each cell's exact
    text), each table read when first used."""

    def __init__(self, directory: Path, manifest: dict[str, Any],
                 tables: dict[str, list[dict[str, str]]] | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.tables = dict(tables or {})

    def table(self, name: str) -> list[dict[str, str]]:
        """The rows of ``<name>.csv`` (one of ``audit``, ``text_clusters``, ``clusters``, ``label_scores``,
        ``groups``, ``group_labels``, ``agreement``), neutralised cells restored."""
        if name not in self.tables:
            self.tables[name] = read_table(self.directory / f"{name}.csv", self.manifest.get("csv_cells"))
        return self.tables[name]

    @property
    def audit(self) -> list[dict[str, str]]:
        return self.table("audit")

    @property
    def text_clusters(self) -> list[dict[str, str]]:
        return self.table("text_clusters")

    @property
    def clusters(self) -> list[dict[str, str]]:
        return self.table("clusters")

    @property
    def label_scores(self) -> list[dict[str, str]]:
        return self.table("label_scores")

    @property
    def groups(self) -> list[dict[str, str]]:
        return self.table("groups")

    @property
    def group_labels(self) -> list[dict[str, str]]:
        return self.table("group_labels")

    @property
    def agreement(self) -> list[dict[str, str]]:
        return self.table("agreement")


def read_table(path: Path, csv_cells: str | None) -> list[dict[str, str]]:
    """The rows of a CSV that ``convlens labels`` or ``convlens global`` wrote (a checked folder), each cell's
    exact text restored where the manifest's ``csv_cells`` says ``neutralised``."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long description is a long cell, not an error
    restored = csv_cells == "neutralised"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [{k: restore(v) if restored and isinstance(v, str) else v for k, v in row.items()}
                for row in csv.DictReader(handle)]
    if any(None in row or None in row.values() for row in rows):
        raise OutputFolderError(f"{path}: rows with a wrong number of cells; write this folder again")
    return rows


def read_labels(directory: str | Path) -> LabelsFolder:
    """Read a folder written by :func:`write_labels`, after checking every file against ``labels.json``.

    Raises :class:`~convlens.core.outputs.OutputFolderError` (a ``ValueError``) with one line naming the
    folder or file for anything else: no folder, no manifest, a file cut short, changed or missing, a
    folder written by an earlier convlens (no checksums: rerun ``convlens labels``)."""
    directory = Path(directory)
    manifest = verify_output_folder(directory, LABELS_FOLDER)
    path = directory / MANIFEST
    if manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version")
        raise OutputFolderError(f"{path}: format version {version}, this convlens reads {FORMAT_VERSION}; "
                                "rerun `convlens labels`")
    if manifest.get("csv_cells") not in CSV_CELLS:
        raise OutputFolderError(f"{path}: csv_cells must be one of {', '.join(CSV_CELLS)}; rerun `convlens labels`")
    for name in TABLES:
        if f"{name}.csv" not in manifest["files"]:
            raise OutputFolderError(f"{directory / f'{name}.csv'}: not listed in {MANIFEST}; rerun `convlens labels`")
    return LabelsFolder(directory, manifest)

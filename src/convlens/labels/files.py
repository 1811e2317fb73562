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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convlens.core.files import atomic_write_text
from convlens.labels.records import AuditRow, LabelsResult
from convlens.labels.scores import ClusterGroup
from convlens.labels.text import load_stop_words

__all__ = ["FORMAT", "FORMAT_VERSION", "LabelsFolder", "read_labels", "write_labels"]

FORMAT = "convlens-labels"
FORMAT_VERSION = 1
MANIFEST = "labels.json"
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


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text with a header row; None as an empty cell, floats with 10 significant digits."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.10g}" if isinstance(v, float) else v) for v in row])
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


def write_labels(result: LabelsResult, out: str | Path) -> Path:
    """Write every file of a labels folder into ``out`` (created if needed); returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    group_of = {c.cluster_id: g.group_id for g in result.groups for c in g.members}
    audit_columns = [f.name for f in fields(AuditRow)]
    files = {
        "audit.csv": csv_text(audit_columns, ([getattr(r, c) for c in audit_columns] for r in result.audit)),
        "text_clusters.csv": csv_text(
            ("class", "text_cluster", "n_distinct", "n_descriptions", "descriptions", "candidates", "representative",
             "representative_score", "lemma", "label"), _text_cluster_rows(result)),
        "clusters.csv": csv_text(CLUSTER_COLUMNS, (
            [c.cluster_id, c.class_name, c.image_id, c.image_name, c.layer, c.layer_depth, c.n_layers, c.cluster_index,
             c.weight, c.fmap_count, c.wins, c.losses, c.resigns, c.level, sum(s.frequency for s in c.scores.values()),
             SEP.join(c.best_labels), group_of.get(c.cluster_id, ""), c.inv_run] for c in result.clusters)),
        "label_scores.csv": csv_text(SCORE_COLUMNS, (
            [c.cluster_id, c.class_name, c.image_id, c.layer, c.layer_depth, c.n_layers, s.label, s.frequency,
             s.mean_level, s.n_correct, s.n_wrong, s.score, s.label in c.best_labels]
            for c in result.clusters for s in sorted(c.scores.values(), key=lambda s: (-s.score, s.label)))),
        "groups.csv": csv_text(GROUP_COLUMNS, _group_rows([*result.groups, *result.full_groups])),
        "group_labels.csv": csv_text(("group_id", "merge", "rank", "label", "strength"), (
            [g.group_id, g.merge, rank, label, strength]
            for g in [*result.groups, *result.full_groups] for rank, (label, strength) in enumerate(g.strengths, 1))),
        "agreement.csv": csv_text([f.name for f in fields(result.agreement[0])] if result.agreement else ["scope"],
                                   (list(asdict(a).values()) for a in result.agreement)),
    }
    for name, text in files.items():
        atomic_write_text(out / name, text)
    manifest = _manifest(result) | {"files": sorted([*files, MANIFEST])}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return out / MANIFEST


class LabelsFolder:
    """A labels folder read back: the manifest and the tables as lists of dicts (strings)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], tables: dict[str, list[dict[str, str]]]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.tables = tables

    @property
    def clusters(self) -> list[dict[str, str]]:
        return self.tables["clusters"]

    @property
    def label_scores(self) -> list[dict[str, str]]:
        return self.tables["label_scores"]

    @property
    def groups(self) -> list[dict[str, str]]:
        return self.tables["groups"]

    @property
    def group_labels(self) -> list[dict[str, str]]:
        return self.tables["group_labels"]

    @property
    def agreement(self) -> list[dict[str, str]]:
        return self.tables["agreement"]


def read_labels(directory: str | Path) -> LabelsFolder:
    """Read a folder written by :func:`write_labels`; ``ValueError`` with a clear message otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory}: no {MANIFEST} (expected the output folder of `convlens labels`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a convlens labels manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version")
        raise ValueError(f"{path}: format version {version}, this convlens reads {FORMAT_VERSION}")
    tables = {}
    for name in ("clusters", "label_scores", "groups", "group_labels", "agreement"):
        table = directory / f"{name}.csv"
        if not table.is_file():
            raise ValueError(f"{directory}: {name}.csv is missing")
        with table.open(newline="", encoding="utf-8") as handle:
            tables[name] = list(csv.DictReader(handle))
    return LabelsFolder(directory, manifest, tables)

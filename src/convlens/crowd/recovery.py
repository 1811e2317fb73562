"""Did the label pipeline find what the simulated crowd was given? Recovery of planted concepts and trends.

* :func:`recovery` — per cluster round of the plan: the best labels the label pipeline gave it
  (``clusters.csv`` of ``convlens labels``, or a :class:`~convlens.labels.pipeline.LabelsResult`)
  and whether they name the planted concept: *recovered* when the cluster has best labels and every one
  of them (ties kept) is a word of the planted concept — its head word, an inflection or a synonym,
  compared as written and by simplemma lemma. A cluster without labels is not recovered.
* :func:`trend_signs` — per class with a planted rising and falling concept: the slope the global report
  gives the concept (``slopes.csv`` of ``convlens global``; the label with the largest total score among
  the concept's words) and whether its sign is the planted one.
* :func:`subsample_export` — a copy of a study export keeping only some plays (the benchmark's "first n
  descriptions of each cluster" and "first b plays of the study").
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.crowd.players import CrowdPlan

__all__ = ["ClusterRecovery", "Recovery", "TrendSign", "recovery", "subsample_export", "trend_signs"]

SEP = "; "


def _lemma(word: str) -> str:
    from convlens.labels.labelling import lemmatize_en

    return lemmatize_en(word)


def concept_matches(label: str, words: Iterable[str]) -> bool:
    """``label`` is one of ``words``, as written or by lemma."""
    words = [w.lower() for w in words]
    label = label.lower()
    return label in words or _lemma(label) in {_lemma(w) for w in words}


@dataclass(frozen=True)
class ClusterRecovery:
    """One planted cluster round and the best labels the pipeline gave it."""

    round_id: str
    cluster_id: str
    true_class: str
    depth: int
    concept: str
    best_labels: tuple[str, ...]
    recovered: bool


@dataclass
class Recovery:
    """Recovery of the planted concepts over the plan's cluster rounds."""

    clusters: list[ClusterRecovery] = field(default_factory=list)

    @property
    def recovered(self) -> int:
        return sum(c.recovered for c in self.clusters)

    @property
    def share(self) -> float:
        return self.recovered / len(self.clusters) if self.clusters else float("nan")


def _best_labels_of(source: Any) -> tuple[dict[str, tuple[str, ...]], str | None]:
    """cluster id -> best labels, and the study id, from a labels folder (path; checked and read with
    :func:`~convlens.labels.files.read_labels`) or a LabelsResult."""
    if isinstance(source, str | Path):
        from convlens.labels.files import read_labels

        folder = read_labels(source)
        best = {row["cluster_id"]: tuple(x for x in row["best_labels"].split(SEP) if x) for row in folder.clusters}
        return best, (folder.manifest.get("study") or {}).get("study_id")
    export = getattr(source, "export", None)
    study_id = (getattr(export, "study", None) or {}).get("study_id")
    return {c.cluster_id: tuple(c.best_labels) for c in source.clusters}, study_id


def _check_same_study(plan: CrowdPlan, study_id: str | None, best: Mapping[str, Any]) -> None:
    """A plan is compared only with the labels of its own study: same study id (where both record one),
    and at least one planted cluster among the labelled ones."""
    if plan.study_id and study_id and plan.study_id != study_id:
        raise ValueError(f"the plan is of study {plan.study_id!r}, the labels of study {study_id!r}: give the "
                         "crowd_plan.json that `convlens study simulate` wrote for this study")
    if best and plan.rounds and not any(p.cluster_id in best for p in plan.rounds.values()):
        raise ValueError(f"none of the plan's {len(plan.rounds)} planted clusters is in the labels: the plan is of "
                         "another study")


def recovery(source: Any, plan: CrowdPlan) -> Recovery:
    """Planted concept vs best labels for every cluster round of ``plan`` (``source``: a labels folder or
    a LabelsResult of the same study; ``ValueError`` for another study's labels)."""
    best, study_id = _best_labels_of(source)
    _check_same_study(plan, study_id, best)
    result = Recovery()
    for planted in sorted(plan.rounds.values(), key=lambda p: p.round_id):
        labels = best.get(planted.cluster_id, ())
        words = plan.concept(planted.concept).words
        ok = bool(labels) and all(concept_matches(label, words) for label in labels)
        result.clusters.append(ClusterRecovery(planted.round_id, planted.cluster_id, planted.true_class,
                                               planted.depth, planted.concept, labels, ok))
    return result


@dataclass(frozen=True)
class TrendSign:
    """A planted trend and the slope the global report found for it (label None: never a label)."""

    class_name: str
    concept: str
    planted: str
    label: str | None
    slope: float
    ci_low: float
    ci_high: float

    @property
    def right_sign(self) -> bool:
        return self.label is not None and (self.slope > 0 if self.planted == "rising" else self.slope < 0)


def _slopes(source: Any) -> dict[str, list[dict[str, Any]]]:
    """class -> slope rows (label, slope, ci_low, ci_high, total_score), from slopes.csv or a GlobalResult."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    if isinstance(source, str | Path):
        from convlens.core.outputs import verify_output_folder
        from convlens.labels.files import GLOBAL_FOLDER, read_table

        manifest = verify_output_folder(source, GLOBAL_FOLDER)
        for row in read_table(Path(source) / "slopes.csv", manifest.get("csv_cells")):
            by_class.setdefault(row["class"], []).append(
                {k: row[k] if k == "label" else float(row[k] or "nan")
                 for k in ("label", "slope", "ci_low", "ci_high", "total_score")})
        return by_class
    for name, trends in source.classes.items():
        by_class[name] = [{"label": t.label, "slope": t.slope, "ci_low": t.ci_low, "ci_high": t.ci_high,
                           "total_score": t.total_score} for t in trends.trends]
    return by_class


def trend_signs(source: Any, plan: CrowdPlan) -> list[TrendSign]:
    """The planted rising and falling concept of every class vs its slope (``source``: a global folder or
    a GlobalResult)."""
    slopes = _slopes(source)
    found = []
    for kind, planted in (("rising", plan.rising), ("falling", plan.falling)):
        for class_name, concept in sorted(planted.items()):
            words = plan.concept(concept).words
            rows = [r for r in slopes.get(class_name, []) if concept_matches(r["label"], words)]
            row = max(rows, key=lambda r: r["total_score"]) if rows else None
            nan = float("nan")
            found.append(TrendSign(class_name, concept, kind, row["label"] if row else None,
                                   row["slope"] if row else nan, row["ci_low"] if row else nan,
                                   row["ci_high"] if row else nan))
    return found


def subsample_export(export_dir: str | Path, out: str | Path,
                     keep: Callable[[int, Mapping[str, str]], bool]) -> Path:
    """Copy a CSV study export to ``out`` keeping the plays (in file order, i.e. the order they started)
    for which ``keep(index, row)`` is true; the other files are copied unchanged."""
    export_dir, out = Path(export_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in export_dir.iterdir():
        if path.is_file() and path.name != "plays.csv":
            shutil.copy2(path, out / path.name)
    with (export_dir / "plays.csv").open(newline="", encoding="utf-8") as source, \
            (out / "plays.csv").open("w", newline="", encoding="utf-8") as target:
        reader = csv.DictReader(source)
        writer = csv.DictWriter(target, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        for index, row in enumerate(reader):
            if keep(index, row):
                writer.writerow(row)
    return out

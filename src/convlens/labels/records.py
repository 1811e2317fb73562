"""The label pipeline's records: its settings, one audit row per play, and the result it returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.labels.agreement import Agreement
from convlens.labels.export import StudyExport
from convlens.labels.gold import GoldFilter
from convlens.labels.labelling import DEFAULT_MAX_K, ClassLabelling
from convlens.labels.scores import WRONG_RULES, ClusterGroup, ClusterStats
from convlens.labels.spelling import DEFAULT_MIN_SIMILARITY as DEFAULT_SPELLING
from convlens.labels.spelling import SpellingFix
from convlens.labels.text import DEFAULT_MAX_CHARS, load_non_visual_words

__all__ = ["AuditRow", "LabelSettings", "LabelsResult"]

LABELLED, WRONG, STATS, UNLABELLED, EXCLUDED = (
    "labelled", "wrong_guess_labelled", "stats_only", "unlabelled", "excluded",
)
UNUSED = "description not used: "


@dataclass(frozen=True)
class LabelSettings:
    """Choices of the label pipeline (all recorded in ``labels.json``).

    ``max_text_clusters``: the silhouette search of each class's text clusters tries k = 2..min(n - 1, this)
    (:func:`convlens.labels.labelling.choose_text_clusters`). ``spelling_similarity``: the OSA similarity
    from which an unknown word is merged into a more frequent one, or removed as a misspelt class name
    (:mod:`convlens.labels.spelling`). ``min_gold_accuracy``: when set, the plays of participants whose gold
    accuracy is below it (with at least ``min_gold_plays`` gold plays) are excluded (:mod:`convlens.labels.gold`);
    off by default.
    """

    max_chars: int = DEFAULT_MAX_CHARS
    wrong_rule: str = "authors"
    class_aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    n_bootstrap: int = 1000
    seed: int = 0
    max_text_clusters: int = DEFAULT_MAX_K
    spelling_similarity: float = DEFAULT_SPELLING
    min_gold_accuracy: float | None = None
    min_gold_plays: int = 1

    def __post_init__(self) -> None:
        if self.wrong_rule not in WRONG_RULES:
            raise ValueError(f"wrong_rule must be one of {WRONG_RULES}, got {self.wrong_rule!r}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}")
        if self.max_text_clusters < 2:
            raise ValueError(f"max_text_clusters must be >= 2, got {self.max_text_clusters}")
        if not 0.5 <= self.spelling_similarity <= 1.0:
            raise ValueError(f"spelling_similarity must be in [0.5, 1] (1 merges nothing), "
                             f"got {self.spelling_similarity}")
        if self.min_gold_accuracy is not None and not 0.0 <= self.min_gold_accuracy <= 1.0:
            raise ValueError(f"min_gold_accuracy must be a share in [0, 1], got {self.min_gold_accuracy}")
        if self.min_gold_plays < 1:
            raise ValueError(f"min_gold_plays must be >= 1, got {self.min_gold_plays}")


@dataclass
class AuditRow:
    """What happened to one play, from its raw description to its label and score."""

    play_id: str
    participant_id: str = ""
    round_id: str = ""
    cluster_id: str = ""
    image_id: str = ""
    layer: str = ""
    layer_depth: int | None = None
    true_class: str = ""
    outcome: str = ""
    level: int | None = None
    guessed_class: str = ""
    correct: bool | None = None
    language: str = ""
    description: str = ""
    translated: str = ""
    cleaned: str = ""
    content: str = ""
    text_rules: str = ""
    status: str = EXCLUDED
    reason: str = ""
    vocabulary_class: str = ""
    text_cluster: int | None = None
    representative: str = ""
    label: str = ""
    label_score: float | None = None
    note: str = ""


@dataclass
class LabelsResult:
    """Everything ``labels`` computed; :func:`convlens.labels.files.write_labels` saves it."""

    export: StudyExport
    embedder: dict[str, Any]
    settings: LabelSettings
    translator: str | None
    audit: list[AuditRow]
    labellings: dict[str, ClassLabelling]
    clusters: list[ClusterStats]
    groups: list[ClusterGroup]
    full_groups: list[ClusterGroup]
    agreement: list[Agreement]
    source: Path = Path()
    inv_runs: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    spelling: dict[str, SpellingFix] = field(default_factory=dict)
    gold: GoldFilter | None = None

    def text_rules(self) -> dict[str, Any]:
        """The text rules of this run for ``labels.json``: non-visual words, spelling fixes, the gold filter."""
        non_visual = load_non_visual_words()
        merged = {w: f.target for w, f in sorted(self.spelling.items()) if f.target}
        names = {w: f.matched for w, f in sorted(self.spelling.items()) if not f.target}
        return {
            "non_visual_words": {c: sum(v == c for v in non_visual.values()) for c in sorted(set(non_visual.values()))},
            "spelling": {"min_similarity": self.settings.spelling_similarity, "merged": merged,
                         "misspelt_class_names": names},
            "gold_filter": self.gold.summary() if self.gold else None,
        }

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(row.status for row in self.audit))

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(row.reason.split(":")[0] for row in self.audit if row.status == EXCLUDED))

    def unused_counts(self) -> dict[str, int]:
        """Counted plays whose description was not used, per reason."""
        return dict(Counter(row.reason.removeprefix(UNUSED).split(":")[0] for row in self.audit
                            if row.status == STATS and row.reason.startswith(UNUSED)))

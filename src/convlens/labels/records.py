"""The label pipeline's records: its settings, one audit row per play, and the result it returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.labels.agreement import Agreement
from convlens.labels.export import StudyExport
from convlens.labels.labelling import ClassLabelling
from convlens.labels.scores import WRONG_RULES, ClusterGroup, ClusterStats
from convlens.labels.text import DEFAULT_MAX_CHARS

__all__ = ["AuditRow", "LabelSettings", "LabelsResult"]

LABELLED, WRONG, STATS, UNLABELLED, EXCLUDED = (
    "labelled", "wrong_guess_labelled", "stats_only", "unlabelled", "excluded",
)
UNUSED = "description not used: "
# Frequency-weighted mean cosine similarity below which a wrong guess's description, unlike every text
# cluster of the guessed class, stays unlabelled. Measured with all-MiniLM-L6-v2: unrelated words and
# phrases give 0.11-0.32 ("water"/"dimples" 0.11, "metal"/"church tower" 0.23, "strings"/"dimples" 0.32),
# related ones 0.44-0.56 ("canopy"/"the colourful sail" 0.44, "cords"/"strings and ropes" 0.48,
# "ropes"/"strings" 0.56), near-paraphrases 0.8-0.9; 0.4 lies between. Other embedders may need another value.
DEFAULT_MIN_SIMILARITY = 0.4


@dataclass(frozen=True)
class LabelSettings:
    """Choices of the label pipeline (all recorded in ``labels.json``).

    ``min_similarity``: a description that is not one of the guessed class's clustered texts (a wrong
    guess) is labelled only if its frequency-weighted mean cosine similarity to the nearest text cluster
    is at least this (default 0.4); otherwise it stays ``unlabelled`` with the similarity recorded.
    """

    max_chars: int = DEFAULT_MAX_CHARS
    wrong_rule: str = "authors"
    class_aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    n_bootstrap: int = 1000
    seed: int = 0
    min_similarity: float = DEFAULT_MIN_SIMILARITY

    def __post_init__(self) -> None:
        if self.wrong_rule not in WRONG_RULES:
            raise ValueError(f"wrong_rule must be one of {WRONG_RULES}, got {self.wrong_rule!r}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be a cosine similarity in [-1, 1], got {self.min_similarity}")


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
    status: str = EXCLUDED
    reason: str = ""
    vocabulary_class: str = ""
    text_cluster: int | None = None
    representative: str = ""
    label: str = ""
    similarity: float | None = None
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

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(row.status for row in self.audit))

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(row.reason.split(":")[0] for row in self.audit if row.status == EXCLUDED))

    def unused_counts(self) -> dict[str, int]:
        """Counted plays whose description was not used, per reason."""
        return dict(Counter(row.reason.removeprefix(UNUSED).split(":")[0] for row in self.audit
                            if row.status == STATS and row.reason.startswith(UNUSED)))

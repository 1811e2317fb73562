"""Gold-round accuracy per participant, read from a study export, and the filter of ``convlens labels``.

Gold rounds are attention checks (an image revealed far more than a cluster round). The study export's
``participants`` table carries, per participant, ``gold_plays`` (gold rounds finished) and
``gold_correct`` (of those, guessed right). With ``min_gold_accuracy`` set, every play of a participant
with at least ``min_gold_plays`` gold plays and an accuracy ``gold_correct / gold_plays`` below the
threshold is excluded from the labels, with the reason in the audit. Participants with fewer gold plays
are kept (there is too little to judge them by) and counted. An export without those columns (or without a
participants table) carries no gold information: the filter then drops nothing and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.labels.export import ExportError, iter_export_table, optional_int

__all__ = ["GOLD_COLUMNS", "GoldFilter", "ParticipantGold", "gold_filter", "read_participant_gold"]

GOLD_COLUMNS = ("gold_plays", "gold_correct")


@dataclass(frozen=True)
class ParticipantGold:
    """One participant's gold record."""

    participant_id: str
    gold_plays: int
    gold_correct: int

    @property
    def accuracy(self) -> float | None:
        return self.gold_correct / self.gold_plays if self.gold_plays else None


@dataclass
class GoldFilter:
    """What the gold filter decided: the participants it drops (id -> reason) and a summary."""

    min_accuracy: float | None
    min_plays: int
    available: bool
    dropped: dict[str, str] = field(default_factory=dict)
    judged: int = 0
    too_few: int = 0
    note: str = ""

    def summary(self) -> dict[str, Any]:
        return {"min_gold_accuracy": self.min_accuracy, "min_gold_plays": self.min_plays,
                "gold_information": self.available, "participants_judged": self.judged,
                "participants_with_too_few_gold_plays": self.too_few, "participants_dropped": len(self.dropped),
                "dropped": dict(sorted(self.dropped.items())), "note": self.note}


def read_participant_gold(export_dir: str | Path) -> dict[str, ParticipantGold] | None:
    """participant id -> gold record from ``participants.csv|jsonl``; None when the export has no such table
    or it lacks the ``gold_plays``/``gold_correct`` columns."""
    try:
        path, rows = iter_export_table(export_dir, "participants")
    except ExportError:
        return None
    found: dict[str, ParticipantGold] = {}
    for number, row in enumerate(rows, start=2):
        if any(column not in row for column in GOLD_COLUMNS) or "participant_id" not in row:
            return None
        try:
            plays, correct = optional_int(row["gold_plays"]) or 0, optional_int(row["gold_correct"]) or 0
        except ValueError as exc:
            raise ExportError(f"{path}: row {number}: gold_plays/gold_correct are not integers ({exc})") from exc
        if not 0 <= correct <= plays:
            raise ExportError(f"{path}: row {number}: gold_correct {correct} outside 0..gold_plays {plays}")
        found[row["participant_id"].strip()] = ParticipantGold(row["participant_id"].strip(), plays, correct)
    return found


def gold_filter(export_dir: str | Path, min_accuracy: float | None, min_plays: int = 1) -> GoldFilter:
    """The participants to drop under ``min_accuracy`` (None: the filter is off)."""
    records = read_participant_gold(export_dir)
    result = GoldFilter(min_accuracy, min_plays, records is not None)
    if records is None:
        result.note = ("the export has no gold information (participants table without gold_plays and "
                       "gold_correct): no participant was judged by gold rounds")
        return result
    if min_accuracy is None:
        result.note = "gold filter off (--min-gold-accuracy not given)"
        return result
    for record in records.values():
        if record.gold_plays < min_plays:
            result.too_few += 1
            continue
        result.judged += 1
        accuracy = record.accuracy or 0.0
        if accuracy < min_accuracy:
            result.dropped[record.participant_id] = (
                f"participant failed gold: {record.gold_correct} of {record.gold_plays} gold rounds right "
                f"({accuracy:.0%}) < min_gold_accuracy {min_accuracy:.0%}")
    result.note = (f"{len(result.dropped)} of {result.judged} participants with >= {min_plays} gold plays dropped; "
                   f"{result.too_few} with fewer kept")
    return result

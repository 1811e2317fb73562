"""The gold-accuracy filter of ``convlens labels`` on hand-written exports: who is dropped at which threshold,
what the audit and labels.json say, and an export without gold columns (the filter does nothing, says so)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.labels.export import ExportError
from convlens.labels.gold import gold_filter, read_participant_gold
from convlens.labels.pipeline import LabelSettings, run_labels
from labels_helpers import ToyEmbedder, make_play, make_round, write_export

TABLE = {"fins": [1, 0], "scales": [0, 1]}
# participant -> (gold_plays, gold_correct): accuracies 1.0, 0.5, 0.25, none judged (0 gold plays)
GOLD = {"good": (4, 4), "half": (2, 1), "poor": (4, 1), "new": (0, 0)}


def _export(tmp_path: Path, columns: tuple[str, ...] = ("gold_plays", "gold_correct")) -> Path:
    r = make_round("T", 0, 0, "tench", n_layers=1)
    plays = [make_play(f"{who}-{k}", r, "win", 1, word, participant=who)
             for who in GOLD for k, word in enumerate(["fins", "scales"])]
    export = write_export(tmp_path / "export", [r], plays, {"study_id": "g", "classes": ["tench"]})
    with (export / "participants.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["participant_id", "nickname", "plays", "wins", *columns])
        for who, (n, right) in GOLD.items():
            writer.writerow([who, who, 2, 2, *[{"gold_plays": n, "gold_correct": right}[c] for c in columns]])
    return export


@pytest.mark.parametrize(("threshold", "dropped"), [
    (None, set()), (0.25, set()), (0.26, {"poor"}), (0.5, {"poor"}), (0.51, {"poor", "half"}), (1.0, {"poor", "half"}),
])
def test_who_fails_gold_at_each_threshold(tmp_path: Path, threshold: float | None, dropped: set[str]) -> None:
    result = gold_filter(_export(tmp_path), threshold)
    assert set(result.dropped) == dropped and result.available
    if threshold is not None:
        assert (result.judged, result.too_few) == (3, 1)  # "new" has no gold play: kept, counted


def test_dropped_participants_are_excluded_with_the_reason(tmp_path: Path) -> None:
    export = _export(tmp_path)
    result = run_labels(export, tmp_path / "labels", ToyEmbedder(TABLE),
                        settings=LabelSettings(n_bootstrap=10, min_gold_accuracy=0.5, min_gold_plays=2))
    audit = {row.play_id: row for row in result.audit}
    assert audit["poor-0"].status == audit["poor-1"].status == "excluded"
    assert audit["poor-0"].reason == "participant failed gold: 1 of 4 gold rounds right (25%) < min_gold_accuracy 50%"
    assert all(audit[f"{who}-0"].status == "labelled" for who in ("good", "half", "new"))
    (cluster,) = result.clusters
    assert cluster.wins == 6  # the dropped participant's plays count nowhere
    manifest = json.loads((tmp_path / "labels" / "labels.json").read_text())
    gold = manifest["text_rules"]["gold_filter"]
    assert gold["participants_dropped"] == 1 and gold["dropped"] == {"poor": audit["poor-0"].reason}
    assert gold["participants_with_too_few_gold_plays"] == 1 and manifest["settings"]["min_gold_accuracy"] == 0.5


def test_an_export_without_gold_columns_drops_nobody_and_says_so(tmp_path: Path) -> None:
    export = _export(tmp_path, columns=())
    assert read_participant_gold(export) is None
    result = run_labels(export, None, ToyEmbedder(TABLE), settings=LabelSettings(n_bootstrap=10, min_gold_accuracy=0.9))
    assert result.gold is not None and not result.gold.available and "no gold information" in result.gold.note
    assert result.status_counts() == {"labelled": 8}
    (export / "participants.csv").unlink()  # no participants table at all: the same
    assert gold_filter(export, 0.9).dropped == {} and "no gold information" in gold_filter(export, 0.9).note


def test_impossible_gold_counts_are_an_error(tmp_path: Path) -> None:
    export = _export(tmp_path)
    (export / "participants.csv").write_text("participant_id,gold_plays,gold_correct\nx,2,3\n")
    with pytest.raises(ExportError, match=r"gold_correct 3 outside 0\.\.gold_plays 2"):
        read_participant_gold(export)


def test_cli_option_and_summary_line(tmp_path: Path) -> None:
    export = _export(tmp_path)
    out = tmp_path / "labels"
    result = CliRunner().invoke(app, ["labels", str(export), "--out", str(out), "--embedder", "minilm",
                                      "--min-gold-accuracy", "0.5", "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "gold filter: 1 of 3 participants with >= 1 gold plays dropped; 1 with fewer kept" in text
    assert "excluded 2" in text

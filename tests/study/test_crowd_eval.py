"""Recovery of planted concepts and trend signs on hand-made label and slope tables; export subsampling."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from convlens.crowd.players import CrowdModel, CrowdPlan, PlantedRound
from convlens.crowd.recovery import concept_matches, recovery, subsample_export, trend_signs


def _plan() -> CrowdPlan:
    rounds = {f"r{i}": PlantedRound(f"r{i}", f"c{i}", "cat", i % 3, 3, "stripes", 0.8) for i in range(5)}
    return CrowdPlan(0, CrowdModel(), {"cat": ["stripes", "ears", "fur"]}, {"cat": "stripes"}, {"cat": "ears"},
                     rounds, ["cat", "dog"])


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.mark.parametrize(("label", "expected"), [
    ("stripes", True), ("stripe", True), ("striped", True), ("bands", True), ("band", True), ("Stripes", True),
    ("dark", False), ("strip", False), ("guess", False),
])
def test_a_label_names_the_concept_by_word_or_lemma(label: str, expected: bool) -> None:
    assert concept_matches(label, _plan().concept("stripes").words) is expected


def test_recovery_from_a_labels_folder_by_hand(tmp_path: Path) -> None:
    _write(tmp_path / "clusters.csv", ["cluster_id", "best_labels"], [
        ["c0", "stripes"],  # recovered
        ["c1", "bands; stripe"],  # a tie between two words of the concept: recovered
        ["c2", "guess; stripes"],  # a tie with an off-topic word: not recovered
        ["c3", ""],  # no label
        # c4 missing from the table (e.g. never played): not recovered
    ])
    found = recovery(tmp_path, _plan())
    assert [c.recovered for c in found.clusters] == [True, True, False, False, False]
    assert found.clusters[1].best_labels == ("bands", "stripe")
    assert (found.recovered, found.share) == (2, pytest.approx(0.4))


def test_recovery_from_a_labels_result() -> None:
    result = SimpleNamespace(clusters=[SimpleNamespace(cluster_id="c0", best_labels=["striped"]),
                                       SimpleNamespace(cluster_id="c1", best_labels=["ears"])])
    assert [c.recovered for c in recovery(result, _plan()).clusters] == [True, False, False, False, False]


def test_trend_signs_from_a_slopes_table(tmp_path: Path) -> None:
    header = ["class", "label", "slope", "ci_low", "ci_high", "total_score"]
    _write(tmp_path / "slopes.csv", header, [
        ["cat", "stripes", "0.5", "0.1", "0.9", "4.0"],
        ["cat", "bands", "-0.2", "-0.5", "0.1", "1.0"],  # same concept, less total score: not the one read
        ["cat", "ears", "0.3", "-0.1", "0.6", "2.0"],  # planted falling, found rising
        ["dog", "ears", "-0.3", "", "", "2.0"],  # another class
    ])
    rising, falling = trend_signs(tmp_path, _plan())
    assert (rising.label, rising.slope, rising.right_sign) == ("stripes", 0.5, True)
    assert (falling.label, falling.slope, falling.right_sign) == ("ears", 0.3, False)
    _write(tmp_path / "slopes.csv", header, [["cat", "fur", "1.0", "", "", "1.0"]])
    missing = trend_signs(tmp_path, _plan())
    assert [s.label for s in missing] == [None, None] and not any(s.right_sign for s in missing)


def test_subsample_export_keeps_the_chosen_plays(tmp_path: Path) -> None:
    source = tmp_path / "export"
    source.mkdir()
    (source / "study.json").write_text("{}")
    _write(source / "rounds.csv", ["round_id"], [["r0"]])
    _write(source / "plays.csv", ["play_id", "round_id"], [[f"p{i}", "r0"] for i in range(6)])
    out = subsample_export(source, tmp_path / "out", lambda index, row: index % 2 == 0 or row["play_id"] == "p5")
    with (out / "plays.csv").open(newline="") as handle:
        assert [row["play_id"] for row in csv.DictReader(handle)] == ["p0", "p2", "p4", "p5"]
    assert (out / "study.json").read_text() == "{}" and (out / "rounds.csv").is_file()

"""Recovery of planted concepts and trend signs on hand-made label and slope tables; export subsampling."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from convlens.core.outputs import FolderKind, OutputFolder
from convlens.crowd.players import CrowdModel, CrowdPlan, PlantedRound
from convlens.crowd.recovery import concept_matches, recovery, subsample_export, trend_signs
from convlens.labels.files import FORMAT_VERSION, GLOBAL_FOLDER, LABELS_FOLDER, TABLES


def _plan() -> CrowdPlan:
    rounds = {f"r{i}": PlantedRound(f"r{i}", f"c{i}", "cat", i % 3, 3, "stripes", 0.8) for i in range(5)}
    return CrowdPlan(0, CrowdModel(), {"cat": ["stripes", "ears", "fur"]}, {"cat": "stripes"}, {"cat": "ears"},
                     rounds, ["cat", "dog"])


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _sealed(out: Path, kind: FolderKind, table: str, header: list[str], rows: list[list[object]],
            others: tuple[str, ...] = (), **manifest: object) -> Path:
    """A folder of ``kind`` holding ``table`` (and header-only ``others``), sealed as the command seals it."""
    if out.exists():
        shutil.rmtree(out)
    with OutputFolder(out, kind) as folder:
        _write(folder.path / table, header, rows)
        for name in others:
            _write(folder.path / name, ["id"], [])
        folder.seal({"csv_cells": "neutralised", **manifest})
    return out


def _labels_folder(out: Path, rows: list[list[object]], study_id: str = "s") -> Path:
    return _sealed(out, LABELS_FOLDER, "clusters.csv", ["cluster_id", "best_labels"], rows,
                   tuple(f"{t}.csv" for t in TABLES if t != "clusters"), format_version=FORMAT_VERSION,
                   study={"study_id": study_id})


@pytest.mark.parametrize(("label", "expected"), [
    ("stripes", True), ("stripe", True), ("striped", True), ("bands", True), ("band", True), ("Stripes", True),
    ("dark", False), ("strip", False), ("guess", False),
])
def test_a_label_names_the_concept_by_word_or_lemma(label: str, expected: bool) -> None:
    assert concept_matches(label, _plan().concept("stripes").words) is expected


def test_recovery_from_a_labels_folder_by_hand(tmp_path: Path) -> None:
    labels = _labels_folder(tmp_path / "labels", [
        ["c0", "stripes"],  # recovered
        ["c1", "bands; stripe"],  # a tie between two words of the concept: recovered
        ["c2", "guess; stripes"],  # a tie with an off-topic word: not recovered
        ["c3", ""],  # no label
        # c4 missing from the table (e.g. never played): not recovered
    ])
    found = recovery(labels, _plan())
    assert [c.recovered for c in found.clusters] == [True, True, False, False, False]
    assert found.clusters[1].best_labels == ("bands", "stripe")
    assert (found.recovered, found.share) == (2, pytest.approx(0.4))


def test_a_plan_of_another_study_is_refused(tmp_path: Path) -> None:
    """Issue 20: a plan of another study gave "0 of 5 recovered" with exit 0."""
    plan = _plan()
    plan.study_id = "s"
    assert recovery(_labels_folder(tmp_path / "same", [["c0", "stripes"]]), plan).recovered == 1
    with pytest.raises(ValueError, match="the plan is of study 's', the labels of study 'other'"):
        recovery(_labels_folder(tmp_path / "other", [["c0", "stripes"]], study_id="other"), plan)
    plan.study_id = None  # a plan written before plans recorded their study: no planted cluster in the labels
    with pytest.raises(ValueError, match="none of the plan's 5 planted clusters is in the labels"):
        recovery(_labels_folder(tmp_path / "elsewhere", [["x0", "stripes"], ["x1", "ears"]]), plan)
    (tmp_path / "plan.json").write_text(json.dumps(_plan().to_json() | {"study_id": "s"}))
    from typer.testing import CliRunner

    from convlens.cli.main import app

    result = CliRunner().invoke(app, ["study", "recovery", str(tmp_path / "plan.json"), str(tmp_path / "other")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error: the plan is of study 's'") and text.count("error") == 1
    # a labels folder that does not check out is named, not read
    (tmp_path / "same" / "clusters.csv").write_text("cluster_id,best_labels\n")
    result = CliRunner().invoke(app, ["study", "recovery", str(tmp_path / "plan.json"), str(tmp_path / "same")])
    assert result.exit_code == 2 and "clusters.csv: does not match labels.json" in " ".join(result.output.split())


def test_recovery_from_a_labels_result() -> None:
    result = SimpleNamespace(clusters=[SimpleNamespace(cluster_id="c0", best_labels=["striped"]),
                                       SimpleNamespace(cluster_id="c1", best_labels=["ears"])])
    assert [c.recovered for c in recovery(result, _plan()).clusters] == [True, False, False, False, False]


def test_trend_signs_from_a_slopes_table(tmp_path: Path) -> None:
    header = ["class", "label", "slope", "ci_low", "ci_high", "total_score"]
    report = _sealed(tmp_path / "global", GLOBAL_FOLDER, "slopes.csv", header, [
        ["cat", "stripes", "0.5", "0.1", "0.9", "4.0"],
        ["cat", "bands", "-0.2", "-0.5", "0.1", "1.0"],  # same concept, less total score: not the one read
        ["cat", "ears", "0.3", "-0.1", "0.6", "2.0"],  # planted falling, found rising
        ["dog", "ears", "-0.3", "", "", "2.0"],  # another class
    ])
    rising, falling = trend_signs(report, _plan())
    assert (rising.label, rising.slope, rising.right_sign) == ("stripes", 0.5, True)
    assert (falling.label, falling.slope, falling.right_sign) == ("ears", 0.3, False)
    _sealed(report, GLOBAL_FOLDER, "slopes.csv", header, [["cat", "fur", "1.0", "", "", "1.0"]])
    missing = trend_signs(report, _plan())
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

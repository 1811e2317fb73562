"""Every stage of a study from Python, as the README's "A study from Python" shows: INV runs -> ``create_study``
-> a simulated crowd over the real HTTP API -> ``export_study_folder`` -> ``run_labels`` -> ``run_study_tcav``
-> ``build_global``. Each stage's output is checked against what the stage before it produced, and against
the CLI run on the same inputs (the CLI only parses: the files must be the same, byte for byte)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from inv_helpers import synthetic_inv_runs

pytestmark = pytest.mark.slow

LAYERS = ["features.13", "features.16"]
PER_CLASS = 4


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[dict[str, Any]]:
    from convlens.crowd.play import simulate
    from convlens.crowd.players import CrowdModel, plan_crowd
    from convlens.labels import LabelSettings, run_labels
    from convlens.reports.global_report import build_global
    from convlens.study import CreateOptions, create_app, create_study, export_study_folder
    from convlens.study.store.config import load_rounds
    from convlens.tcav import run_study_tcav

    root = tmp_path_factory.mktemp("python-api")
    synthetic_inv_runs(root / "run", LAYERS, PER_CLASS, size=100)
    created = create_study(root / "study", [root / "run"], CreateOptions(plays_per_round=2, quota=3, seed=0))
    rounds = load_rounds(root / "study")
    classes = sorted({r.true_class for r in rounds})
    plan = plan_crowd(rounds, classes, CrowdModel(trends=False, describe=1.0, typo=0.0), seed=0)
    server = create_app(root / "study", None, rate_limit_ip="1000000/minute",
                        rate_limit_participant="1000000/minute", rate_limit_consent="1000000/minute")
    try:
        crowd = simulate(root / "study", plan, participants=60, app=server, concurrent=4)
    finally:
        server.state.engine.dispose()
    files = export_study_folder(root / "study", root / "export")
    labels = run_labels(root / "export", root / "labels", settings=LabelSettings(n_bootstrap=50))
    with pytest.warns(UserWarning, match="6 random runs"):  # few runs keep the test short; the run says so
        tcav = run_study_tcav(root / "labels", root / "tcav", layers=LAYERS, sizes=(4,), random_runs=6,
                              random_pool="study")
    built = build_global(root / "labels", root / "global", n_bootstrap=50, tcav=tcav.csv_path)
    yield {"root": root, "created": created, "rounds": rounds, "crowd": crowd, "files": files, "labels": labels,
           "tcav": tcav, "global": built}


def test_export_holds_every_finished_play_of_the_crowd(study: dict[str, Any]) -> None:
    root = study["root"]
    assert {p.name for p in study["files"]} >= {"plays.csv", "events.csv", "rounds.csv", "study.json"}
    plays = [r for r in _rows(root / "export" / "plays.csv") if r["outcome"] in {"win", "lose", "resign"}]
    finished = [p for p in study["crowd"].plays if p.outcome in {"win", "lose", "resign"}]
    assert len(plays) == len(finished) > 0
    assert {r["round_id"] for r in plays} <= {r.round_id for r in study["rounds"]}
    created = json.loads((root / "study" / "study.json").read_text())
    assert json.loads((root / "export" / "study.json").read_text())["study_id"] == created["study_id"]
    assert study["created"]["rounds"] == sum(not r.gold for r in study["rounds"])


def test_labels_cover_the_played_cluster_rounds(study: dict[str, Any]) -> None:
    root = study["root"]
    played = {r["round_id"] for r in _rows(root / "export" / "plays.csv")
              if r["outcome"] in {"win", "lose", "resign"} and r["gold"] == "false"}
    clusters = _rows(root / "labels" / "clusters.csv")
    by_round = {r.round_id: r for r in study["rounds"] if not r.gold}
    assert {c["cluster_id"] for c in clusters} == {by_round[r].cluster_id for r in played}
    assert sum(int(c["n_labels"]) > 0 for c in clusters) > 0


def test_tcav_and_global_read_what_the_stage_before_wrote(study: dict[str, Any]) -> None:
    """Global's "used by the model" cell of a label says what tcav.csv's verdicts for that concept say."""
    root = study["root"]
    verdicts: dict[tuple[str, str], list[str]] = {}
    for row in _rows(study["tcav"].csv_path):
        if row["layer"]:
            verdicts.setdefault((row["class"], row["concept"]), []).append(row["verdict"])
    assert verdicts and all(len(v) == len(LAYERS) for v in verdicts.values())
    with (root / "global" / "slopes.csv").open(newline="", encoding="utf-8") as handle:
        cells = {(r["class"], r["label"]): r["tcav_used_by_model"] for r in csv.DictReader(handle)}
    assert set(verdicts) <= set(cells)
    for key, found in verdicts.items():
        if any(v.startswith("used") for v in found):
            assert cells[key].startswith("yes: "), (key, found, cells[key])
        elif all(v.startswith("cannot test") for v in found):
            assert cells[key].startswith("cannot test"), (key, found, cells[key])
        else:
            assert cells[key].startswith("no evidence at this power"), (key, found, cells[key])


@pytest.mark.parametrize("stage", ["export", "labels", "tcav", "global"])
def test_the_cli_writes_the_same_files(study: dict[str, Any], stage: str, tmp_path: Path) -> None:
    """The CLI on the same input gives the same bytes (files that record a time or a path excepted)."""
    root = study["root"]
    if stage == "export":
        _cli("study", "export", str(root / "study"), "--out", str(tmp_path / stage))
        names = ["plays.csv", "events.csv", "rounds.csv", "participants.csv", "data_dictionary.json"]
    elif stage == "labels":
        _cli("labels", str(root / "export"), "--out", str(tmp_path / stage), "--bootstrap", "50")
        names = ["clusters.csv", "group_labels.csv", "label_scores.csv", "audit.csv", "agreement.csv"]
    elif stage == "tcav":
        _cli("tcav", str(root / "labels"), "--out", str(tmp_path / stage), "--layers", ",".join(LAYERS),
             "--sizes", "4", "--random-runs", "6", "--random-pool", "study", "--no-place")
        names = ["tcav.csv"]
    else:
        _cli("global", str(root / "labels"), "--out", str(tmp_path / stage), "--bootstrap", "50", "--tcav",
             str(study["tcav"].csv_path))
        names = ["slopes.csv"]
    for name in names:
        assert (tmp_path / stage / name).read_bytes() == (root / stage / name).read_bytes(), name

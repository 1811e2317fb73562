"""``convlens tcav`` on a study's own concepts: the concept sets against a literal re-computation, the
skipping rules, the command end to end on a small labels folder built here from tiny INV runs, bad input,
and the verdicts in the global report.

The labels folder: two classes, four images each (scikit-image pictures, rotated), a tiny CNN explained by
INV at its three conv layers; every cluster is played by hand-written plays — heaviest cluster of a layer
"stripes", the others "fur", each with one extra right guess of the other label at level 5 (so clusters
carry both labels, and the level of a region must come from its own label's plays).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from convlens.cli.main import app
from convlens.core.files import is_temporary_name
from convlens.core.outputs import verify_output_folder
from convlens.inv.reveal import REVEAL_PERCENTAGES, reveal_image
from convlens.labels.files import read_labels
from convlens.labels.pipeline import LabelSettings, run_labels
from convlens.models import LoadedModel, register_model
from convlens.models.preprocessing import Preprocessing
from convlens.models.zoo import unregister_model
from convlens.reports.global_report import build_global, read_tcav, tcav_verdict
from convlens.tcav.concept_sets import RandomSets, tensor_digest
from convlens.tcav.stats import holm
from convlens.tcav.study import TCAV_FOLDER
from convlens.tcav.study_concepts import (
    StudyConceptError,
    build_study_concepts,
    check_model,
    concept_size,
    model_input,
)
from labels_helpers import ToyEmbedder, make_play, write_export

CLASSES = ["cat", "coffee", "astronaut", "rocket", "horse"]
PICTURES = {"cat": "chelsea", "coffee": "coffee"}
LAYERS = ["block1.2", "block2.2", "block3.1"]
SIZE = 64
MODEL = "tcav-study-tiny"
PREP = Preprocessing(size=SIZE, resize=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
TABLE = {"stripes": [1.0, 0.0, 0.0], "fur": [0.0, 1.0, 0.0]}
SIGMA_BY_FACTOR = {2: 3.0, 4: 6.0, 8: 12.0, 16: 16.0, 32: 24.0}  # spec 4.4 (heatmap_utils.py)


def _loaded(make_model: Any, seed: int = 0) -> LoadedModel:
    return LoadedModel(MODEL, make_model(seed=seed, num_classes=5, width=8), PREP, list(CLASSES), True, "test")


def _pictures() -> list[tuple[str, str, Image.Image]]:
    import skimage.data

    found = []
    for class_name, picture in PICTURES.items():
        pixels = np.asarray(getattr(skimage.data, picture)())[..., :3]
        for turns in range(4):
            image = Image.fromarray(np.ascontiguousarray(np.rot90(pixels, turns))).resize(
                (SIZE, SIZE), Image.Resampling.BILINEAR)
            found.append((class_name, f"{picture}{turns}", image))
    return found


def _inv_run(root: Path, make_model: Any) -> Path:
    """``convlens explain --method inv``-shaped run: <name>/inv/{inv.json, input.png, ...}."""
    from convlens.inv import INV

    inv = INV(_loaded(make_model), layers=LAYERS)
    for class_name, name, image in _pictures():
        x = PREP(image)[None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            explanation = inv.explain(x, target=CLASSES.index(class_name),
                                      image_id=hashlib.sha256(np.asarray(image).tobytes()).hexdigest())
        explanation.save(root / name / "inv", image=image)
    return root


def _levels(depth: int, index: int) -> list[int]:
    """Levels of a cluster's plays of its main label: mean depth + index/2 (ceil tested by hand)."""
    return [depth, min(depth + index, 5)]


def _export(root: Path, run: Path, label_of: Any) -> Path:
    from convlens.inv import load_inv_explanation

    rounds, plays = [], []
    for folder in sorted(run.glob("*/inv")):
        e = load_inv_explanation(folder)
        for depth, layer in enumerate(e.layers):
            for c in layer.clusters:
                r = {"round_id": f"r-{c.id}", "cluster_id": c.id, "image_id": e.image_id,
                     "image_name": folder.parent.name, "layer": layer.name, "layer_depth": depth, "n_layers": 3,
                     "cluster_index": c.index, "cluster_weight": c.weight, "fmap_count": len(c.channels),
                     "true_class": e.target_name, "gold": False, "inv_run": "run"}
                rounds.append(r)
                main = label_of(e.target_name, depth, c.index)
                other = "" if not main else "fur" if main == "stripes" else "stripes"
                for i, level in enumerate(_levels(depth, c.index)):
                    plays.append(make_play(f"{c.id}-{i}", r, "win", level, main))
                plays.append(make_play(f"{c.id}-x", r, "win", 5, other))
    study = {"study_id": "tcav-test", "classes": CLASSES[:2], "inv_runs": [{"name": "run", "path": str(run)}],
             "reveal_levels": {str(i): q for i, q in enumerate(REVEAL_PERCENTAGES)}}
    return write_export(root / "export", rounds, plays, study)


def _default_label(class_name: str, depth: int, index: int) -> str:
    return "stripes" if index == 0 else "fur"


def _labels(root: Path, run: Path, label_of: Any = _default_label) -> Path:
    export = _export(root, run, label_of)
    run_labels(export, root / "labels", ToyEmbedder(TABLE), settings=LabelSettings(n_bootstrap=10))
    return root / "labels"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, make_model: Any) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tcav-study")
    run = _inv_run(root / "run", make_model)
    return run, _labels(root, run)


@pytest.fixture
def registered(make_model: Any) -> Any:
    register_model(MODEL, lambda weights: _loaded(make_model, seed=0 if weights is None else 1))
    yield
    unregister_model(MODEL)


def _literal_reveal(image: np.ndarray, cluster_map: np.ndarray, percent: float) -> np.ndarray:
    """Spec 4.4 written out: tile the h x h map by f = H / h, keep the top ``percent`` % (percentile
    threshold), blur the binary mask with scikit-image (sigma by f, truncate 1.5), multiply, truncate."""
    from skimage.filters import gaussian

    factor = image.shape[0] // cluster_map.shape[0]
    tiled = np.kron(np.asarray(cluster_map, dtype=np.float64), np.ones((factor, factor)))
    mask = (tiled >= np.percentile(tiled, 100 - percent)).astype(np.float64)
    soft = gaussian(mask, sigma=SIGMA_BY_FACTOR.get(factor, 3.0), truncate=1.5, mode="nearest", preserve_range=True)
    return (image.astype(np.float64) * soft[..., None]).astype(np.uint8)


def _by_hand_levels(labels_dir: Path) -> dict[tuple[str, str], int]:
    """(cluster, best label) -> ceil(mean level of that label's plays), from the audit trail."""
    levels: dict[tuple[str, str], list[int]] = {}
    with (labels_dir / "audit.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["label"]:
                levels.setdefault((row["cluster_id"], row["label"]), []).append(int(row["level"]))
    return {k: math.ceil(sum(v) / len(v)) for k, v in levels.items()}


def test_concept_images_are_the_game_reveal_at_the_guessing_level(study: tuple[Path, Path], make_model: Any) -> None:
    _, labels_dir = study
    folder = read_labels(labels_dir)
    concepts = build_study_concepts(folder, model_input(PREP), reveal_image, sizes=(4, 8), random_runs=5)
    levels = _by_hand_levels(labels_dir)
    best = {row["cluster_id"]: row["best_labels"] for row in folder.clusters}
    tested = [(name, c) for name, k in concepts.class_ids.items() for c in concepts.concepts[k]]
    assert sorted((n, c.name) for n, c in tested) == [("cat", "fur"), ("cat", "stripes"), ("coffee", "fur"),
                                                      ("coffee", "stripes")]
    for name, concept in tested:
        regions = concepts.regions[(name, concept.name)]
        assert concept.size == len(regions) == 8
        for region, tensor in zip(regions, concept.images, strict=True):
            assert best[region.cluster_id] == concept.name  # a cluster whose best label is the concept
            assert region.level == levels[(region.cluster_id, concept.name)]  # its own label's plays only
            inv = concepts.images[region.image_id]
            pixels = np.asarray(Image.open(inv.folder / "input.png").convert("RGB"))
            cluster_map = np.load(next(inv.folder.glob(f"L*_{region.layer}/c{region.cluster_id.rsplit(':', 1)[1]}"
                                                       "_feature.npy")))
            literal = _literal_reveal(pixels, cluster_map, REVEAL_PERCENTAGES[region.level])
            expected = torch.from_numpy(literal.astype(np.float32) / 255.0).permute(2, 0, 1)
            assert torch.equal(tensor, expected)  # mean 0, std 1: the model's input is the revealed picture / 255


def test_input_png_is_the_models_view(study: tuple[Path, Path], make_model: Any) -> None:
    """The INV input was PREP(image); input.png through model_input gives the same tensor, and the model
    reproduces every run's recorded score; another model's weights do not."""
    _, labels_dir = study
    concepts = build_study_concepts(read_labels(labels_dir), model_input(PREP), reveal_image, sizes=(4,),
                                    random_runs=5)
    originals = {name: image for _, name, image in _pictures()}
    for image in concepts.images.values():
        x = PREP(originals[image.folder.parent.name])
        assert torch.equal(model_input(PREP)(image.pixels), x)
    assert all(c.matches for c in check_model(_loaded(make_model).module, concepts.images, model_input(PREP)))
    assert not any(c.matches for c in check_model(_loaded(make_model, 1).module, concepts.images, model_input(PREP)))


def test_pool_holds_every_labelled_region_of_the_class(study: tuple[Path, Path]) -> None:
    _, labels_dir = study
    folder = read_labels(labels_dir)
    concepts = build_study_concepts(folder, model_input(PREP), reveal_image, sizes=(4,), random_runs=5,
                                    random_pool="class")
    for name, k in concepts.class_ids.items():
        labelled = [r for r in folder.clusters if r["class"] == name and r["best_labels"]]
        assert concepts.pools[name] == len(labelled) == concepts.random_sets[k].pool.shape[0]
        concept_rows = {tuple(t.flatten()[:50].tolist()) for c in concepts.concepts[k] for t in c.images}
        pool_rows = {tuple(t.flatten()[:50].tolist()) for t in concepts.random_sets[k].pool}
        assert concept_rows <= pool_rows  # the concept's regions are drawn from the pool too


def test_study_pool_is_every_labelled_region_of_the_study(study: tuple[Path, Path]) -> None:
    _, labels_dir = study
    folder = read_labels(labels_dir)
    concepts = build_study_concepts(folder, model_input(PREP), reveal_image, sizes=(4,), random_runs=5,
                                    random_pool="study")
    pools = [concepts.random_sets[k] for k in concepts.class_ids.values()]
    assert pools[0] is pools[1]  # one pool: its random-vs-random CAVs serve every class
    assert pools[0].pool.shape[0] == len([r for r in folder.clusters if r["best_labels"]])
    assert concepts.describe()["random_pool"] == "study"


def test_sizes_and_skipping_rules() -> None:
    assert concept_size(25, 100, (10, 20, 40)) == 20  # largest size the concept fills
    assert concept_size(25, 30, (10, 20, 40)) == 10  # the pool must be twice as large
    assert concept_size(9, 100, (10, 20, 40)) is None and concept_size(10, 19, (10, 20)) is None
    assert concept_size(2, 4, (2,), random_runs=5) == 2  # C(4, 2) = 6 > 5 distinct random sets
    assert concept_size(2, 4, (2,), random_runs=6) is None


def test_random_sets_are_distinct_and_never_the_concept() -> None:
    pool = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    sets = RandomSets(pool, seed=3)
    first = sets.draw(2, 0)
    runs = sets.runs(2, 5, exclude=(first.digest,))
    digests = [s.digest for s in runs]
    assert len(set(digests)) == 5 and first.digest not in digests  # 6 pairs: all but the excluded one
    with pytest.raises(ValueError, match="fewer than 6 distinct sets"):
        sets.runs(2, 6, exclude=(first.digest,))
    big = RandomSets(torch.randn(50, 3, 2, 2), seed=1)
    assert [s.digest for s in big.runs(5, 4)] == [big.draw(5, i).digest for i in range(4)]  # nothing skipped


def test_small_labels_are_skipped_with_their_reason(study: tuple[Path, Path]) -> None:
    """Size 12: a label needs 12 distinct regions and a class pool of 24. Counted from clusters.csv: cat has 12
    "stripes" clusters (the heaviest of 3 layers x 4 images), fewer "fur" ones and a pool under 24; coffee
    has 12 or more of each and a pool of 24 or more, so exactly cat's two labels are skipped."""
    _, labels_dir = study
    folder = read_labels(labels_dir)
    concepts = build_study_concepts(folder, model_input(PREP), reveal_image, sizes=(12,), random_runs=5,
                                    random_pool="class")
    count = {(name, label): sum(r["class"] == name and r["best_labels"] == label for r in folder.clusters)
             for name in PICTURES for label in ("fur", "stripes")}
    pool = {name: sum(r["class"] == name and bool(r["best_labels"]) for r in folder.clusters) for name in PICTURES}
    assert count[("cat", "stripes")] == 12 and count[("cat", "fur")] < 12 and pool["cat"] < 24
    assert min(count[("coffee", "fur")], count[("coffee", "stripes")]) >= 12 and pool["coffee"] >= 24
    assert concepts.available == count and concepts.pools == pool  # every region's reveal is a distinct image
    skipped = {(s.class_name, s.label): (s.regions, s.reason) for s in concepts.skipped}
    assert skipped == {
        ("cat", "fur"): (count[("cat", "fur")],
                         f"{count[('cat', 'fur')]} distinct region(s), fewer than the smallest concept size 12"),
        ("cat", "stripes"): (12, f"the random pool has {pool['cat']} regions, fewer than 2 x 12"),
    }
    assert sorted(c.name for c in concepts.concepts[concepts.class_ids["coffee"]]) == ["fur", "stripes"]
    described = concepts.describe()
    assert {(s["class_name"], s["label"]) for s in described["skipped"]} == set(skipped)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["tcav", *args])


def test_cli_end_to_end_and_the_global_report(study: tuple[Path, Path], tmp_path: Path, registered: None) -> None:
    _, labels_dir = study
    labels = tmp_path / "labels"
    shutil.copytree(labels_dir, labels)
    out = tmp_path / "tcav"
    result = _cli(str(labels), "--out", str(out), "--sizes", "4,8", "--random-runs", "5")
    assert result.exit_code == 0, result.output
    assert "warning: TCAV with 5 random runs" in result.output
    with (out / "tcav.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    tests = [r for r in rows if r["layer"]]
    assert sorted({(r["class"], r["concept"], r["layer"]) for r in tests}) == sorted(
        (c, label, layer) for c in PICTURES for label in ("fur", "stripes") for layer in LAYERS)
    for name in PICTURES:  # Holm over all tests of a class, recomputed from the raw p values
        mine = [r for r in tests if r["class"] == name]
        assert np.allclose(holm([float(r["p"]) for r in mine]), [float(r["p_value"]) for r in mine])
        for r in mine:
            assert r["significant"] == str(float(r["p_value"]) < 0.05)
            assert r["direction"] == ("positive" if float(r["mean_difference"]) > 0 else "negative")
    manifest = json.loads((out / "tcav.json").read_text())
    assert manifest["model"]["name"] == MODEL and manifest["model"]["check"]["all_match"]
    assert manifest["layers"] == LAYERS and manifest["random_runs"] == 5
    assert manifest["concepts"]["classes"]["cat"]["concepts"]["stripes"]["size"] == 8
    assert (labels / "tcav.csv").read_text() == (out / "tcav.csv").read_text()  # placed for convlens global
    first = (out / "tcav.csv").read_text()
    again = _cli(str(labels), "--out", str(tmp_path / "again"), "--sizes", "4", "--random-runs", "5", "--layers",
                 "block3.1")
    assert again.exit_code == 0, again.output
    assert (labels / "tcav.previous.csv").read_text() == first  # a different tcav.csv there is kept, not lost
    assert (labels / "tcav.csv").read_text() == (tmp_path / "again" / "tcav.csv").read_text()
    (labels / "tcav.csv").write_text(first)
    build_global(labels, tmp_path / "global", n_bootstrap=10)
    page = (tmp_path / "global" / "cat" / "index.html").read_text()
    for label in ("fur", "stripes"):
        mine = [r for r in tests if r["class"] == "cat" and r["concept"] == label]
        smallest = min(mine, key=lambda r: float(r["p_value"]))
        assert f"p_value={float(smallest['p_value']):.3g}" in page  # the verdict cell shows p and effect
        assert f"effect_size={float(smallest['effect_size']):.3g}" in page


def test_verdict_cell_texts() -> None:
    rows = [{"layer": "L0", "significant": "true", "direction": "positive", "p_value": "0.000123456", "effect_size":
             "4.56789", "layer_role": "last"},
            {"layer": "L1", "significant": "false", "direction": "negative", "p_value": "0.5", "effect_size": "-0.2",
             "detectable_effect_size": "4.123"}]
    assert tcav_verdict(rows) == "yes: L0 (direction=positive, p_value=0.000123, effect_size=4.57)"
    assert tcav_verdict(rows[1:]) == ("no evidence at this power (1 layer tested; |effect_size| >= 4.1 is detected): "
                                      "smallest p_value=0.5 at L1 (direction=negative, effect_size=-0.2)")
    earlier = [{**rows[0], "layer_role": "earlier"}]
    assert tcav_verdict(earlier) == ("yes: L0 (earlier layer, no known answer; direction=positive, p_value=0.000123, "
                                     "effect_size=4.57)")
    skipped = [{"layer": "", "significant": "", "verdict": "skipped: 3 distinct region(s), fewer than 10"}]
    assert tcav_verdict(skipped) == "not tested: 3 distinct region(s), fewer than 10"
    constant = [{"layer": "L0", "significant": "", "verdict": "cannot test: the null is constant (...)"}]
    assert tcav_verdict(constant) == "cannot test: the null is constant (...)"
    assert tcav_verdict(None) == "not tested"


def _fails(args: list[str], out: Path, message: str) -> None:
    result = _cli(*args, "--out", str(out), "--sizes", "4", "--random-runs", "5")
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1, result.output
    assert not out.exists()  # nothing written


def test_bad_input_gives_one_line_and_exit_2(study: tuple[Path, Path], tmp_path: Path, registered: None) -> None:
    run, labels_dir = study
    unlabelled = _labels(tmp_path / "u", run, lambda *_: "")  # plays without descriptions
    _fails([str(unlabelled)], tmp_path / "o1", "no labelled cluster")
    one = _labels(tmp_path / "one", run, lambda c, d, i: "stripes" if c == "coffee" else _default_label(c, d, i))
    _fails([str(one), "--random-pool", "class"], tmp_path / "o2", "class 'coffee' has one concept ('stripes')")
    _fails([str(one), "--random-pool", "class-others"], tmp_path / "o2b", "class 'coffee' has one concept")
    assert _cli(str(one), "--out", str(tmp_path / "o3"), "--sizes", "4", "--random-runs", "5", "--classes",
                "cat", "--random-pool", "class").exit_code == 0  # leaving it out works
    assert _cli(str(one), "--out", str(tmp_path / "o3b"), "--sizes", "4", "--random-runs", "5",
                "--layers", "block3.1").exit_code == 0  # random sets from the whole study (default) need no second
    moved = tmp_path / "moved"
    shutil.copytree(labels_dir, moved)
    manifest = json.loads((moved / "labels.json").read_text())
    manifest["inv_runs"] = {"run": str(tmp_path / "nowhere")}
    (moved / "labels.json").write_text(json.dumps(manifest))
    _fails([str(moved)], tmp_path / "o4", "INV run 'run' not found")
    _fails([str(labels_dir), "--weights", "other.pt"], tmp_path / "o5", "does not reproduce the INV runs")
    _fails([str(tmp_path / "missing")], tmp_path / "o6", "no such folder")
    _fails([str(labels_dir), "--classes", "dog"], tmp_path / "o7", "not in the labels folder")
    _fails([str(labels_dir), "--layers", "block9"], tmp_path / "o8", "--layers")


def test_a_run_without_a_recorded_model_needs_model(study: tuple[Path, Path], tmp_path: Path,
                                                    registered: None) -> None:
    run, labels_dir = study
    anonymous = tmp_path / "run"
    shutil.copytree(run, anonymous)
    for path in anonymous.glob("*/inv/inv.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "model": None}))
    _fails([str(labels_dir), "--inv-root", str(anonymous)], tmp_path / "o1", "pass --model")
    result = _cli(str(labels_dir), "--inv-root", str(anonymous), "--model", MODEL, "--out", str(tmp_path / "o2"),
                  "--sizes", "4", "--random-runs", "5", "--no-place", "--layers", "block3.1")
    assert result.exit_code == 0, result.output
    with pytest.raises(StudyConceptError, match="concept sizes"):
        build_study_concepts(read_labels(labels_dir), model_input(PREP), reveal_image, sizes=(1,))


# --- the output folder, placing into the labels folder, the cache, a killed run ------------------------------


def _run(labels: Path, out: Path, *extra: str, runs: int = 5) -> Any:
    return _cli(str(labels), "--out", str(out), "--sizes", "4", "--random-runs", str(runs), "--layers", "block3.1",
                *extra)


def _copy(labels_dir: Path, tmp_path: Path) -> Path:
    labels = tmp_path / "labels"
    shutil.copytree(labels_dir, labels)
    return labels


def test_placing_never_replaces_a_users_tcav_csv(study: tuple[Path, Path], tmp_path: Path, registered: None) -> None:
    labels = _copy(study[1], tmp_path)
    (labels / "tcav.csv").write_text("the user's own\n")
    result = _run(labels, tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "warning: not placed:" in result.output and "was not placed by convlens tcav" in result.output
    assert (labels / "tcav.csv").read_text() == "the user's own\n" and not (labels / "tcav.placed.json").exists()
    assert (tmp_path / "a" / "tcav.csv").is_file()  # the run's own folder has the results
    (labels / "tcav.csv").unlink()
    assert _run(labels, tmp_path / "a").exit_code == 0
    placed = (labels / "tcav.csv").read_bytes()
    assert placed == (tmp_path / "a" / "tcav.csv").read_bytes()
    record = json.loads((labels / "tcav.placed.json").read_text())
    assert record["placed"][-1]["sha256"] == hashlib.sha256(placed).hexdigest()
    assert _run(labels, tmp_path / "b", runs=6).exit_code == 0  # other results replace convlens's own copy
    assert (labels / "tcav.previous.csv").read_bytes() == placed
    assert (labels / "tcav.csv").read_bytes() == (tmp_path / "b" / "tcav.csv").read_bytes()
    edited = (labels / "tcav.csv").read_text() + "a note of the user's\n"
    (labels / "tcav.csv").write_text(edited)  # edited by hand: the user's now
    result = _run(labels, tmp_path / "c")
    assert result.exit_code == 0 and "warning: not placed" in result.output
    assert (labels / "tcav.csv").read_text() == edited and (labels / "tcav.previous.csv").read_bytes() == placed


def test_an_out_folder_holding_a_users_file_is_refused(study: tuple[Path, Path], tmp_path: Path,
                                                       registered: None) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "tcav.csv").write_text("mine")
    result = _run(study[1], out, "--no-place")
    assert result.exit_code == 2 and "holds 'tcav.csv', which convlens tcav did not write" in result.output
    assert [p.name for p in out.iterdir()] == ["tcav.csv"] and (out / "tcav.csv").read_text() == "mine"


def test_a_rerun_reuses_the_cache_and_a_damaged_cache_file_is_trained_again(
    study: tuple[Path, Path], tmp_path: Path, registered: None
) -> None:
    out = tmp_path / "o"
    assert _run(study[1], out, "--no-place").exit_code == 0
    first = json.loads((out / "tcav.json").read_text())
    text = (out / "tcav.csv").read_text()
    assert first["counts"]["cavs_trained"] > 0 and first["counts"]["cavs_loaded"] == 0
    assert set(first["files"]) == {"tcav.csv"}  # sealed without the CAV cache
    verify_output_folder(out, TCAV_FOLDER)
    assert _run(study[1], out, "--no-place").exit_code == 0  # the folder replaced whole, its cache carried over
    second = json.loads((out / "tcav.json").read_text())
    assert second["counts"]["cavs_trained"] == 0 and second["counts"]["cavs_loaded"] == first["counts"]["cavs_trained"]
    assert (out / "tcav.csv").read_text() == text  # the same CAVs: the same verdicts, to the last digit
    victim = sorted((out / "cavs").rglob("*.pkl"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # cut short
    result = _run(study[1], out, "--no-place")
    assert result.exit_code == 0, result.output
    assert f"warning: CAV cache file {victim.relative_to(out)}" in result.output and "trained again" in result.output
    third = json.loads((out / "tcav.json").read_text())
    assert (third["counts"]["cavs_recomputed"], third["counts"]["cavs_trained"]) == (1, 1)
    _same_results(out / "tcav.csv", text)  # the CAV trained alone: the same direction (to float rounding)
    (out / "tcav.csv").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"tcav\.csv: does not match tcav\.json"):
        read_tcav(out / "tcav.csv")  # convlens global never reads a cut tcav.csv


def _same_results(path: Path, text: str) -> None:
    """The same tests, verdicts and columns, numbers equal to 1e-6 relative."""
    with path.open(newline="") as handle:
        now = list(csv.DictReader(handle))
    before = list(csv.DictReader(io.StringIO(text)))
    assert [r["verdict"] for r in now] == [r["verdict"] for r in before] and len(now) == len(before)
    for row, old in zip(now, before, strict=True):
        assert row.keys() == old.keys()
        for key in row:
            try:
                assert float(row[key]) == pytest.approx(float(old[key]), rel=1e-6, abs=1e-12, nan_ok=True), key
            except ValueError:
                assert row[key].split() == old[key].split() or [float(v) for v in row[key].split()] == pytest.approx(
                    [float(v) for v in old[key].split()], rel=1e-5, abs=1e-9), key


_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import make_tiny_cnn
    import test_tcav_study as T
    import convlens.tcav.study as study
    from convlens.models import register_model
    register_model(T.MODEL, lambda weights: T._loaded(make_tiny_cnn))
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # tcav.csv and the CAV files written aside, the folder not sealed
    study._manifest = die
    from convlens.cli.main import app
    app(["tcav", sys.argv[2], "--out", sys.argv[3], "--sizes", "4", "--random-runs", "5", "--layers", "block3.1",
         "--seed", "1"])
""")


def test_a_killed_run_leaves_the_previous_folder_whole(study: tuple[Path, Path], tmp_path: Path,
                                                       registered: None) -> None:
    labels = _copy(study[1], tmp_path)
    out = tmp_path / "o"
    assert _run(labels, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    placed = (labels / "tcav.csv").read_bytes()
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    for target in (out, tmp_path / "fresh"):
        killed = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(labels), str(target)],
                                capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "fresh").exists()  # a first run killed leaves no folder to be read
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the previous one, whole
    verify_output_folder(out, TCAV_FOLDER)
    assert (labels / "tcav.csv").read_bytes() == placed
    assert any(is_temporary_name(p.name) for p in tmp_path.iterdir())  # what the kills left beside the folders
    rerun = _run(labels, out, "--seed", "1")
    assert rerun.exit_code == 0, rerun.output
    assert not any(is_temporary_name(p.name) for p in tmp_path.iterdir())  # and the rerun removed
    verify_output_folder(out, TCAV_FOLDER)
    assert (labels / "tcav.csv").read_bytes() == (out / "tcav.csv").read_bytes() != placed


def test_class_others_pool_leaves_the_concepts_own_regions_out(study: tuple[Path, Path]) -> None:
    folder = read_labels(study[1])
    concepts = build_study_concepts(folder, model_input(PREP), reveal_image, sizes=(4,), random_runs=5,
                                    random_pool="class-others")
    for name, k in concepts.class_ids.items():
        pools = concepts.random_sets[k]
        assert isinstance(pools, dict) and set(pools) == {c.name for c in concepts.concepts[k]}
        for concept in concepts.concepts[k]:
            others = [r for r in folder.clusters if r["class"] == name and r["best_labels"]
                      and concept.name not in r["best_labels"].split("; ")]
            assert pools[concept.name].pool.shape[0] == len(others)  # every region's reveal is a distinct image
            pooled = {tensor_digest(t) for t in pools[concept.name].pool}
            assert not pooled & set(concept.image_digests)


def test_a_cut_input_png_is_named(study: tuple[Path, Path], tmp_path: Path, registered: None) -> None:
    run, labels_dir = study
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    png = sorted(broken.glob("*/inv/input.png"))[0]
    png.write_bytes(png.read_bytes()[:300])
    _fails([str(labels_dir), "--inv-root", str(broken)], tmp_path / "o", f"{png}: unreadable image")


def test_help_defines_the_statistic_and_lists_every_option() -> None:
    from convlens.cli.tcav import STATISTIC_HELP

    text = CliRunner().invoke(app, ["tcav", "--help"]).output
    for option in ("--statistic", "--seed", "--device", "--batch-size", "--random-pool", "--random-runs", "--sizes",
                   "--alpha", "--layers", "--classes", "--model", "--weights", "--inv-root", "--place", "--out"):
        assert option in text
    assert "magnitude (default) = the mean, over the class's images, of the directional derivative" in STATISTIC_HELP


_NAMES = ["tcav.csv", "tcav.json", "cavs", "notes.txt", ".convlens-tmp-notes", ".convlens-tmp-" + "a" * 31,
          ".hidden", "sub", "=formula", "Tcav.CSV"]


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.one_of(st.sampled_from(_NAMES), st.text("abcXY019._- é", min_size=1,
                                                                               max_size=8)),
                                  st.sampled_from(["file", "dir", "dir-with-file"]), st.binary(max_size=8)),
                        max_size=4, unique_by=lambda e: e[0].lower()).filter(
                            lambda es: all(e[0] not in (".", "..") and not is_temporary_name(e[0]) for e in es)),
       place=st.sampled_from(["the folder", "a new folder in it", "a folder of the user's in it"]))
def test_the_output_rule_holds_whatever_the_user_keeps(study: tuple[Path, Path], registered: None,
                                                       entries: list, place: str) -> None:
    """Whatever a user keeps in --out or around it: refused with one line and nothing changed, or done with
    nothing of the user's changed and nothing new outside --out (the rule of convlens.core.outputs)."""
    root = Path(tempfile.mkdtemp(prefix="rule-"))
    try:
        folder = root / "user"
        folder.mkdir()
        for name, kind, content in entries:
            if kind == "file":
                (folder / name).write_bytes(content)
            else:
                (folder / name).mkdir()
                if kind == "dir-with-file":
                    (folder / name / "mine.txt").write_bytes(content)
        dirs = [name for name, kind, _ in entries if kind != "file"]
        out = {"the folder": folder, "a new folder in it": folder / "results-new",
               "a folder of the user's in it": folder / dirs[0] if dirs else folder / "results-new"}[place]
        before = _snapshot(root)
        result = _run(study[1], out, "--no-place")
        after = _snapshot(root)
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            lines = [line for line in result.output.splitlines() if not line.startswith("warning:")]
            assert len(lines) == 1 and lines[0].startswith("error: ") and after == before, result.output
            return
        assert {k: v for k, v in before.items() if after.get(k) != v} == {}  # nothing of the user's changed
        prefix = out.relative_to(root).as_posix()
        assert [k for k in after if k not in before and not (k == prefix or k.startswith(prefix + "/"))] == []
        assert not any(k.startswith(prefix + "/") for k in before)  # never into a folder holding the user's files
        verify_output_folder(out, TCAV_FOLDER)
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""`study create`: rounds from INV runs, reveal images as the spec computes them, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.inv import load_inv_explanation
from convlens.study.batch.create import CreateOptions, StudyCreationError, create_study
from convlens.study.store.config import load_rounds, load_study
from study.conftest import CLASSES, IMAGES
from study.test_reveal import literal_reveal


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name not in ("secrets.json", "study.json")}


def test_rounds_cover_every_kept_cluster_with_spec_images(inv_run: Path, study_template: Path) -> None:
    rounds = load_rounds(study_template)
    config = load_study(study_template)
    explanations = {p.parent.parent.name: load_inv_explanation(p.parent) for p in inv_run.glob("*/inv/inv.json")}
    clusters = {c.id: (name, e, depth, layer, c) for name, e in explanations.items()
                for depth, layer in enumerate(e.layers) for c in layer.clusters}
    normal = [r for r in rounds if not r.gold]
    assert sorted(r.cluster_id for r in normal) == sorted(clusters)
    for r in normal:
        name, explanation, depth, layer, cluster = clusters[r.cluster_id]
        assert (r.image_id, r.image_name, r.layer, r.layer_depth, r.n_layers, r.cluster_index) == (
            explanation.image_id, name, layer.name, depth, len(explanation.layers), cluster.index)
        # write_inv_run explains IMAGES[i % 5] (rotated i // 5 quarter turns) for class CLASSES[i % 5]
        expected = CLASSES[IMAGES.index(name.rstrip("0123456789"))]
        assert r.true_class == explanation.target_name == expected
        assert r.fmap_count == len(cluster.channels) and r.cluster_weight == pytest.approx(cluster.weight)
        pixels = np.asarray(Image.open(inv_run / name / "inv" / "input.png").convert("RGB"))
        for level, q in enumerate(config.reveal_percentages):
            shown = np.asarray(Image.open(study_template / "images" / r.round_id / f"level{level}.png"))
            np.testing.assert_array_equal(shown, literal_reveal(pixels, cluster.feature_map, q)[0])
        full = np.asarray(Image.open(study_template / "images" / r.round_id / "full.png"))
        np.testing.assert_array_equal(full, pixels)
    gold = [r for r in rounds if r.gold]
    assert len(gold) == 1 and gold[0].cluster_id is None and gold[0].layer is None
    assert config.gold_percentages == [50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    assert config.classes == CLASSES and config.inv_runs[0].format_version >= 1


def test_gold_rounds_are_rendered_at_the_gold_percentages(inv_run: Path, study_template: Path) -> None:
    """A gold round shows its image through the heaviest cluster of the deepest layer at 50..100 %."""
    config = load_study(study_template)
    (gold,) = [r for r in load_rounds(study_template) if r.gold]
    explanation = load_inv_explanation(inv_run / gold.image_name / "inv")
    deepest = [layer for layer in explanation.layers if layer.clusters][-1]
    pixels = np.asarray(Image.open(inv_run / gold.image_name / "inv" / "input.png").convert("RGB"))
    assert gold.true_class == explanation.target_name and gold.image_id == explanation.image_id
    assert config.gold_percentages != config.reveal_percentages
    for level, q in enumerate(config.gold_percentages):
        shown = np.asarray(Image.open(study_template / "images" / gold.round_id / f"level{level}.png"))
        np.testing.assert_array_equal(shown, literal_reveal(pixels, deepest.clusters[0].feature_map, q)[0])
    last = np.asarray(Image.open(study_template / "images" / gold.round_id / "level5.png")).astype(int)
    assert np.abs(last - pixels).max() <= 1  # 100 %: the whole image (floor of x times a blurred mask of ~1)


def test_creation_is_deterministic(inv_run: Path, tmp_path: Path, study_template: Path) -> None:
    again = tmp_path / "again"
    create_study(again, [inv_run], CreateOptions(classes=CLASSES, gold=1, plays_per_round=2, rounds_per_player=50,
                                                 completion_code="DONE42"))
    assert _files(again) == _files(study_template)
    first = json.loads((study_template / "study.json").read_text())
    second = json.loads((again / "study.json").read_text())
    first.pop("study_id"), second.pop("study_id")
    assert first == second
    assert (again / "secrets.json").stat().st_mode & 0o077 == 0  # owner-only


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"classes": ["cat", "rocket"]}, "not in the study's classes"),
    ({"layers": ["nope"]}, "are in no INV run"),
    ({"gold": 99}, "--gold 99"),
    ({"classes": CLASSES, "languages": ["english!"]}, "BCP-47"),
])
def test_bad_options_give_one_clear_error_and_write_nothing(inv_run: Path, tmp_path: Path, kwargs: dict,
                                                           message: str) -> None:
    target = tmp_path / "bad"
    with pytest.raises((StudyCreationError, ValueError), match=message):
        create_study(target, [inv_run], CreateOptions(**kwargs))
    assert not target.exists()
    assert not list(tmp_path.glob(".study-*"))  # no temporary folder left behind


def test_missing_runs_and_existing_folder(inv_run: Path, tmp_path: Path, study_template: Path) -> None:
    with pytest.raises(StudyCreationError, match="no INV results"):
        create_study(tmp_path / "s1", [tmp_path])
    with pytest.raises(StudyCreationError, match="not empty"):
        create_study(study_template, [inv_run])


def test_cli_create_and_errors(inv_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from convlens.cli.main import app

    classes = tmp_path / "classes.txt"
    classes.write_text("# study classes\n" + "\n".join(CLASSES) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["study", "create", str(tmp_path / "s"), "--from", str(inv_run), "--classes",
                                 str(classes), "--gold", "2", "--layers", "block3.1", "--title", "My study"])
    assert result.exit_code == 0, result.output
    rounds = load_rounds(tmp_path / "s")
    assert {r.layer for r in rounds if not r.gold} == {"block3.1"} and sum(r.gold for r in rounds) == 2
    assert load_study(tmp_path / "s").title == "My study"
    normal, images = sum(not r.gold for r in rounds), len({r.image_id for r in rounds})
    needed = -(-normal * 3 // images)  # default plays per round: 3; one round per image and participant
    assert f"at most {images} rounds (one per image): {normal} rounds x 3 plays need at least {needed}" in " ".join(
        result.output.split())
    bad = runner.invoke(app, ["study", "create", str(tmp_path / "t"), "--from", str(inv_run), "--gold", "-1"])
    assert bad.exit_code == 2 and "--gold -1" in bad.output and not (tmp_path / "t").exists()

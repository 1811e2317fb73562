"""`study create`: rounds from INV runs, reveal images as the spec computes them, determinism, bad input."""

from __future__ import annotations

import json
import time
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
    with pytest.raises(StudyCreationError, match="not an empty folder"):
        create_study(study_template, [inv_run])


def test_cli_create_prints_the_quota_and_capacity(inv_run: Path, tmp_path: Path) -> None:
    """The tiny run at ``block3.1``: three images with two clusters each (6 rounds); gold rounds on chelsea and
    coffee (``--gold 2``, seed 0). Quota 3 (one round per image, 3 images), gold 1 (rate 0.1 of 3, at least 1),
    so every participant plays all three images: one of chelsea/coffee as gold, the other two as cluster
    rounds. Astronaut is never gold, so its 2 rounds x 3 plays = 6 slots admit 6 participants, who use 12
    of the 18 cluster slots (chelsea and coffee: one cluster play each per participant)."""
    from typer.testing import CliRunner

    from convlens.cli.main import app

    classes = tmp_path / "classes.txt"
    classes.write_text("# study classes\n" + "\n".join(CLASSES) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["study", "create", str(tmp_path / "s"), "--from", str(inv_run), "--classes",
                                 str(classes), "--gold", "2", "--layers", "block3.1", "--title", "My study"])
    assert result.exit_code == 0, result.output
    rounds = load_rounds(tmp_path / "s")
    assert {r.layer for r in rounds if not r.gold} == {"block3.1"}
    assert sorted(r.image_name for r in rounds if r.gold) == ["chelsea", "coffee"]
    assert sorted(r.image_name for r in rounds if not r.gold) == ["astronaut"] * 2 + ["chelsea"] * 2 + ["coffee"] * 2
    config = load_study(tmp_path / "s")
    assert (config.title, config.quota, config.gold_rate, config.lease_seconds) == ("My study", 3, 0.1, 1200)
    text = " ".join(result.output.split())
    assert "6 rounds + 2 gold rounds from 3 images" in text
    assert "Quota: each participant finishes 3 rounds (one per image), 1 of them gold, for the completion code" in text
    assert "Capacity: 6 participants (6 rounds x 3 plays = 18 plays; they fill 12)." in text
    assert "Note: 6 plays cannot be given to a full quota" in text
    bad = runner.invoke(app, ["study", "create", str(tmp_path / "t"), "--from", str(inv_run), "--gold", "-1"])
    assert bad.exit_code == 2 and "--gold -1" in bad.output and not (tmp_path / "t").exists()
    too_many = runner.invoke(app, ["study", "create", str(tmp_path / "u"), "--from", str(inv_run), "--quota", "4"])
    flat = " ".join(too_many.output.split())
    assert too_many.exit_code == 2 and "quota 4 cannot be finished" in flat and "at most 3 images" in flat
    assert not (tmp_path / "u").exists() and "Traceback" not in too_many.output


def test_a_missing_inv_json_is_named_or_skipped(inv_run: Path, tmp_path: Path) -> None:
    """One image's inv.json gone: creation stops with its folder's name; --skip-broken leaves it out, says so."""
    import shutil

    from typer.testing import CliRunner

    from convlens.cli.main import app

    run = tmp_path / "run"
    shutil.copytree(inv_run, run)
    (run / "coffee" / "inv" / "inv.json").unlink()
    with pytest.raises(StudyCreationError, match=r"coffee/inv: no inv.json .*--skip-broken"):
        create_study(tmp_path / "refused", [run], CreateOptions(classes=CLASSES))
    assert not (tmp_path / "refused").exists()
    result = CliRunner().invoke(app, ["study", "create", str(tmp_path / "s"), "--from", str(run), "--skip-broken"])
    assert result.exit_code == 0, result.output
    assert "skipped:" in result.output and "coffee" in " ".join(result.output.split())
    assert {r.image_name for r in load_rounds(tmp_path / "s")} == {"chelsea", "astronaut"}


KILLED_CREATE = """
import os, sys, time
from pathlib import Path
import convlens.study.batch.create as create

real = create._render

def render(root, planned):
    real(root, planned[:2])
    Path(sys.argv[1]).write_text(str(root))  # the temporary folder exists and is half written
    time.sleep(600)

create._render = render
from convlens.cli.main import app
app(sys.argv[2:], prog_name="convlens")
"""


def test_a_killed_create_leaves_nothing_a_rerun_does_not_remove(inv_run: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    target, marker = tmp_path / "studies" / "pilot", tmp_path / "marker"
    args = ["study", "create", str(target), "--from", str(inv_run)]
    child = subprocess.Popen([sys.executable, "-c", KILLED_CREATE, str(marker), *args])
    try:
        for _ in range(6000):
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), "the child never reached the rendering"
        half = Path(marker.read_text())
        assert half.parent == target.parent and half.name.startswith(".convlens-tmp-") and half.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not target.exists()  # nothing half written at the study's place
    rerun = subprocess.run([sys.executable, "-m", "convlens", *args], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["pilot"]  # the killed run's temporaries are gone
    assert len(load_rounds(target)) > 2 and (target / "secrets.json").is_file()

"""`convlens evaluate`: records equal direct metric calls, resume after interruption (in process and after
SIGKILL) ends with the same tables, bad images are listed and skipped, settings are checked, the
sise-voc2007 preset runs on a VOC fixture and says clearly when data are missing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_tiny_cnn
from convlens.core.maps import minmax_normalize
from convlens.data.synthetic import CLASS_NAMES, SyntheticShapes
from convlens.data.synthetic_models import SYNTHETIC_PREPROCESSING
from convlens.methods.gradcam import GradCAM
from convlens.metrics.base import bootstrap_ci
from convlens.metrics.faithfulness import DeletionAUC, DropPercent, InsertionAUC
from convlens.metrics.localisation import BoundingBoxAccuracy, EnergyPointingGame
from convlens.models.zoo import LoadedModel, wrap
from convlens.runners.evaluate import EvaluationConfig, EvaluationError, run_evaluation
from convlens.runners.store import ResultsStore, SettingsMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


METRICS = ["ebpg", "bbox", "pointing_game", "drop", "increase", "insertion"]


def _tiny_model() -> LoadedModel:
    return wrap(make_tiny_cnn(num_classes=4), SYNTHETIC_PREPROCESSING, CLASS_NAMES, name="tiny")


def _config(out: Path, **overrides: object) -> EvaluationConfig:
    settings: dict[str, object] = {
        "model": "tiny", "methods": ["gradcam", "scorecam"], "data": "synthetic", "limit": 5, "metrics": METRICS,
        "out": out, "metric_params": {"insertion": {"step": 256}}, "n_samples": 2,
    }
    settings.update(overrides)
    return EvaluationConfig(**settings)  # type: ignore[arg-type]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _without_timings(out: Path) -> tuple[object, ...]:
    """The run's tables minus wall-clock timings (the only values that differ between identical runs)."""
    per_image = [{k: v for k, v in row.items() if k != "seconds"} for row in _csv(out / "per_image.csv")]
    summary = [row for row in _csv(out / "summary.csv") if row["metric"] != "seconds"]
    lines = (out / "summary.md").read_text().splitlines()
    table = [line.split(" | ") for line in lines if line.startswith("|")]
    column = next(i for i, cell in enumerate(table[0]) if cell.startswith("seconds"))
    markdown = [[cell for i, cell in enumerate(row) if i != column] for row in table]
    return per_image, summary, markdown


def test_records_equal_direct_metric_calls_and_summary_is_their_mean(tmp_path: Path) -> None:
    model = _tiny_model()
    result = run_evaluation(_config(tmp_path / "run"), model=model)
    rows = _csv(result.files["per_image"])
    assert len(rows) == 5 * 2 and result.n_images == 5
    # literal re-computation of image 3 with Grad-CAM
    sample = SyntheticShapes(size=5, seed=0).load(3)
    x = SYNTHETIC_PREPROCESSING(sample.image)[None]
    label = sample.labels[0]
    maps = GradCAM(model).explain(x, [label]).maps
    mask = torch.from_numpy(sample.masks[label])[None]
    expected = {
        "ebpg": EnergyPointingGame()(maps, mask)[0].item(),
        "bbox": BoundingBoxAccuracy()(maps, mask)[0].item(),
        "drop": DropPercent(batch_size=64)(model.module, x, maps, [label])[0].item(),
        "insertion": InsertionAUC(step=256)(model.module, x, maps, [label])[0].item(),
    }
    row = next(r for r in rows if r["index"] == "3" and r["method"] == "gradcam")
    assert int(row["target"]) == label
    for name, value in expected.items():
        assert float(row[name]) == pytest.approx(value, abs=1e-9), name
    # summary = mean and bootstrap CI of the per-image column
    summary = {(s["method"], s["metric"]): s for s in result.summary}
    column = [float(r["ebpg"]) for r in rows if r["method"] == "scorecam"]
    assert summary[("scorecam", "ebpg")]["mean"] == pytest.approx(np.mean(column))
    assert (summary[("scorecam", "ebpg")]["ci_low"], summary[("scorecam", "ebpg")]["ci_high"]) == bootstrap_ci(column)
    # the written tables and report
    md = result.files["summary_md"].read_text()
    assert "| gradcam |" in md and "ebpg ↑" in md and "drop ↓" in md
    html = result.files["report"].read_text()
    assert "metrics.png" in html and "curves.png" in html
    assert (tmp_path / "run/report_files/metrics.png").is_file()
    overlays = sorted((tmp_path / "run/samples/gradcam").glob("*.png"))
    assert len(overlays) == 2  # --samples 2


def test_interrupted_run_resumes_to_the_same_tables(tmp_path: Path) -> None:
    model = _tiny_model()
    settings = {"methods": ["gradcam", "rise"], "method_params": {"rise": {"n_masks": 64}}, "limit": 4,
                "metrics": ["ebpg", "drop", "insertion"]}
    run_evaluation(_config(tmp_path / "full", **settings), model=model)
    partial = run_evaluation(_config(tmp_path / "resumed", **settings), model=model, stop_after=2)
    assert partial.interrupted and partial.n_images == 2
    first_records = sorted((tmp_path / "resumed/records/rise").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in first_records}
    done: list[int] = []
    run_evaluation(_config(tmp_path / "resumed", **settings), model=model, progress=lambda d, n, i: done.append(d))
    assert done == [3, 4]  # only the two missing images were processed
    assert all(p.stat().st_mtime_ns == stamps[p] for p in first_records)  # finished work untouched
    assert _without_timings(tmp_path / "resumed") == _without_timings(tmp_path / "full")


def test_settings_mismatch_is_refused_unless_overwrite(tmp_path: Path) -> None:
    model = _tiny_model()
    run_evaluation(_config(tmp_path, limit=1, methods=["gradcam"]), model=model)
    with pytest.raises(SettingsMismatchError, match="metrics"):
        run_evaluation(_config(tmp_path, limit=1, methods=["gradcam"], metrics=["ebpg"]), model=model)
    result = run_evaluation(_config(tmp_path, limit=1, methods=["gradcam"], metrics=["ebpg"], overwrite=True),
                            model=model)
    assert [s["metric"] for s in result.summary] == ["ebpg", "seconds"]


def test_bad_images_are_listed_escaped_and_skipped(tmp_path: Path) -> None:
    data = tmp_path / "images"
    for i, name in enumerate(["a.png", "b.png"]):
        (data / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), dtype=np.uint8)).save(data / "c" / name)
    (data / "c" / "<script>bad.png").write_bytes(b"\x89PNG broken")
    config = _config(tmp_path / "run", data=str(data), metrics=["drop", "increase"], methods=["gradcam"],
                     targets="predicted", limit=None)
    result = run_evaluation(config, model=_tiny_model())
    assert result.n_images == 2 and [b["id"] for b in result.bad_images] == ["c/<script>bad.png"]
    bad_rows = _csv(result.files["bad_images"])
    assert bad_rows[0]["id"] == "c/<script>bad.png" and "not an image" in bad_rows[0]["reason"]
    html = result.files["report"].read_text()
    assert "&lt;script&gt;bad.png" in html and "<script>bad" not in html  # autoescaped
    # a rerun does not retry it and lists it again
    again = run_evaluation(config, model=_tiny_model(), progress=lambda *a: pytest.fail("nothing left to do"))
    assert len(again.bad_images) == 1


def test_ground_truth_metric_on_data_without_masks_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "c" / "a.png")
    with pytest.raises(EvaluationError, match="needs ground-truth boxes or masks"):
        run_evaluation(_config(tmp_path / "run", data=str(tmp_path), metrics=["ebpg"]), model=_tiny_model())
    with pytest.raises(EvaluationError, match="data not found"):
        run_evaluation(_config(tmp_path / "run", data=str(tmp_path / "nope")), model=_tiny_model())
    with pytest.raises(EvaluationError, match="unknown metric"):
        run_evaluation(_config(tmp_path / "run", metrics=["nope"]), model=_tiny_model())


def test_store_writes_atomically(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path, {"a": 1})
    store.put("m", "0000001-x", {"v": 1.5})
    assert json.loads(store.path("m", "0000001-x").read_text()) == {"v": 1.5}
    assert not [p for p in (tmp_path / "records/m").iterdir() if p.name.startswith(".")]  # no temp file left


# ----------------------------------------------------------------------------------------------- CLI
def _cli() -> object:
    from convlens.cli.main import app

    return app


def test_cli_synthetic_run_and_kill_then_resume(tmp_path: Path) -> None:
    """A real `convlens evaluate` process is killed with SIGKILL mid-run; rerunning the same command skips
    the finished images and ends with the same tables as an uninterrupted run."""
    args = ["evaluate", "--data", "synthetic", "--model", "synthetic-vgg", "--methods", "gradcam,rise",
            "--metrics", "ebpg,drop", "--limit", "6", "--param", "rise.n_masks=500", "--no-progress",
            "--samples", "1"]
    clean = CliRunner().invoke(_cli(), [*args, "--out", str(tmp_path / "clean")])  # type: ignore[arg-type]
    assert clean.exit_code == 0, clean.output
    assert "ebpg" in clean.output and "gradcam" in clean.output
    out = tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "convlens.cli.main", *args, "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "records/rise").glob("*.json"))) < 2:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    finished = len(list((out / "records/rise").glob("*.json")))
    assert 2 <= finished < 6, "the run was not killed mid-way"
    resumed = CliRunner().invoke(_cli(), [*args, "--out", str(out)])  # type: ignore[arg-type]
    assert resumed.exit_code == 0, resumed.output
    assert _without_timings(out) == _without_timings(tmp_path / "clean")


def test_cli_preset_without_data_or_weights_says_what_is_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_cli(), ["evaluate", "--preset", "sise-voc2007"])  # type: ignore[arg-type]
    assert result.exit_code == 2 and "VOCtest_06-Nov-2007.tar" in result.output
    result = runner.invoke(_cli(), ["evaluate", "--preset", "sise-voc2007", "--data", str(tmp_path)])  # type: ignore[arg-type]
    assert result.exit_code == 2 and "--weights" in result.output
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    result = runner.invoke(_cli(), ["evaluate", "--preset", "sise-voc2007", "--data", str(tmp_path / "VOCdevkit"),  # type: ignore[arg-type]
                                    "--model", "resnet18", "--weights", str(weights)])
    assert result.exit_code == 2 and "data not found" in result.output
    result = runner.invoke(_cli(), ["evaluate", "--preset", "sise-voc2007", "--data", str(tmp_path),  # type: ignore[arg-type]
                                    "--model", "resnet18", "--weights", str(weights)])
    assert result.exit_code == 2 and "VOCtest_06-Nov-2007.tar" in result.output
    result = runner.invoke(_cli(), ["evaluate", "--data", "synthetic", "--metrics", "ebpg",  # type: ignore[arg-type]
                                    "--metric-param", "ebpg.step=3"])
    assert result.exit_code == 2 and "ebpg accepts clip_negative" in result.output
    result = runner.invoke(_cli(), ["evaluate"])  # type: ignore[arg-type]
    assert result.exit_code == 2 and "no data" in result.output


def test_cli_sise_voc2007_preset_on_a_voc_fixture(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    xml = ("<annotation><filename>{n}.jpg</filename><object><name>{c}</name><difficult>0</difficult><bndbox>"
           "<xmin>40</xmin><ymin>50</ymin><xmax>160</xmax><ymax>200</ymax></bndbox></object></annotation>")
    rng = np.random.default_rng(0)
    for n, c in (("000001", "dog"), ("000002", "cat")):
        Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{n}.jpg")
        (voc / "Annotations" / f"{n}.xml").write_text(xml.format(n=n, c=c))
    (voc / "ImageSets/Main/test.txt").write_text("000001\n000002\n")
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "voc_resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=20).state_dict(), weights)
    result = CliRunner().invoke(_cli(), [  # type: ignore[arg-type]
        "evaluate", "--preset", "sise-voc2007", "--data", str(tmp_path), "--model", "resnet18", "--weights",
        str(weights), "--methods", "gradcam", "--out", str(tmp_path / "out"), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path / "out/per_image.csv")
    assert [r["target_name"] for r in rows] == ["dog", "cat"]  # each annotated class is explained
    settings = json.loads((tmp_path / "out/run.json").read_text())
    assert settings["metrics"] == ["ebpg", "miou", "bbox", "drop", "increase"]
    assert settings["metric_score"] == "sigmoid" and settings["data"]["type"] == "VOCDetection"
    assert all(r["ebpg"] != "" and r["drop"] != "" for r in rows)


def test_advise_metrics_come_from_one_avx_run(tmp_path: Path) -> None:
    pytest.importorskip("piq")
    from convlens.metrics.advise_protocol import AVX

    model = _tiny_model()
    config = _config(tmp_path, methods=["gradcam"], limit=1, metrics=["avx", "avx_ssim", "class_sensitivity"])
    result = run_evaluation(config, model=model)
    row = _csv(result.files["per_image"])[0]
    sample = SyntheticShapes(size=1, seed=0).load(0)
    x = SYNTHETIC_PREPROCESSING(sample.image)[None]
    label = sample.labels[0]
    with torch.no_grad():
        probabilities = torch.softmax(model.module(x), 1)[0]
    probabilities[label] = -1
    runner_up = int(probabilities.argmax())
    m1 = minmax_normalize(GradCAM(model).explain(x, [label]).maps)
    m2 = minmax_normalize(GradCAM(model).explain(x, [runner_up]).maps)
    expected = AVX()(model, np.array(sample.image), m1, m2, class_id=label)
    assert float(row["avx"]) == pytest.approx(float(expected.avx[0]), abs=1e-9)
    assert float(row["avx_ssim"]) == pytest.approx(float(expected.ssim[0]), abs=1e-9)
    assert float(row["class_sensitivity"]) == pytest.approx(float(expected.class_sensitivity[0]), abs=1e-9)


def test_folder_labels_are_the_models_class_names(tmp_path: Path) -> None:
    for name in (CLASS_NAMES[2], CLASS_NAMES[0]):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / name / "x.png")
    config = _config(tmp_path / "run", data=str(tmp_path), metrics=["drop"], methods=["gradcam"], limit=None)
    rows = _csv(run_evaluation(config, model=_tiny_model()).files["per_image"])
    # sorted folders are [circle..., triangle...]; the explained classes are the model's ids 0 and 2
    assert sorted(int(r["target"]) for r in rows) == [0, 2]
    (tmp_path / "zebra").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "zebra" / "y.png")
    with pytest.raises(EvaluationError, match="model's class names"):
        run_evaluation(_config(tmp_path / "run2", data=str(tmp_path), metrics=["drop"]), model=_tiny_model())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_instances_json_is_detected_and_evaluated(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    annotations = {
        "images": [{"id": 3, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 7, "name": "kite"}, {"id": 2, "name": "person"}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 7, "iscrowd": 0, "area": 400, "bbox": [10, 10, 20, 20],
                         "segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(annotations))
    config = _config(tmp_path / "run", data=str(tmp_path / "instances.json"), images=str(tmp_path),
                     metrics=["ebpg", "bbox"], methods=["gradcam"], limit=None)
    rows = _csv(run_evaluation(config, model=_tiny_model()).files["per_image"])
    assert len(rows) == 1 and rows[0]["id"] == "3" and rows[0]["target"] == "1"  # kite = category 7 = class 1
    assert 0 <= float(rows[0]["ebpg"]) <= 1 and rows[0]["bbox"] != ""
    with pytest.raises(EvaluationError, match="--images"):
        run_evaluation(_config(tmp_path / "r2", data=str(tmp_path / "instances.json")), model=_tiny_model())


def test_black_substrate_is_the_models_normalised_black(tmp_path: Path) -> None:
    model = _tiny_model()
    config = _config(tmp_path, methods=["gradcam"], limit=1, metrics=["deletion", "drop"],
                     metric_params={"deletion": {"substrate": "black", "step": 512}, "drop": {"baseline": "black"}})
    row = _csv(run_evaluation(config, model=model).files["per_image"])[0]
    sample = SyntheticShapes(size=1, seed=0).load(0)
    x = SYNTHETIC_PREPROCESSING(sample.image)[None]
    maps = GradCAM(model).explain(x, sample.labels).maps
    black = torch.full((3, 1, 1), -1.0)  # (0 - 0.5) / 0.5
    expected = DeletionAUC(substrate=black, step=512)(model.module, x, maps, sample.labels)[0].item()
    assert float(row["deletion"]) == pytest.approx(expected, abs=1e-9)
    assert expected != pytest.approx(DeletionAUC(step=512)(model.module, x, maps, sample.labels)[0].item(), abs=1e-6)
    with pytest.raises(ValueError, match="normalised black"):
        DeletionAUC(substrate="black")(model.module, x, maps, sample.labels)

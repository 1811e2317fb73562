"""The evaluation runner: records equal direct metric calls and literal re-computations (ground truth,
perturbation, AVX, MPRT and random-logit, sigmoid scores, method parameters, several explained classes per
image, a metric of a new family), an interrupted run resumes to the same tables, bad images are listed and
skipped, settings are checked, and the per-image evaluator pickles (the command line: test_evaluate_cli)."""

from __future__ import annotations

import copy
import csv
import json
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.core.maps import minmax_normalize
from convlens.data.synthetic import CLASS_NAMES, SyntheticShapes
from convlens.methods.gradcam import GradCAM
from convlens.metrics.base import Metric, bootstrap_ci
from convlens.metrics.context import MetricContext, MetricValue
from convlens.metrics.faithfulness import DeletionAUC, DropPercent, InsertionAUC
from convlens.metrics.localisation import BoundingBoxAccuracy, EnergyPointingGame
from convlens.metrics.registry import METRICS as REGISTERED_METRICS
from convlens.metrics.registry import MetricSpec
from convlens.models.synthetic import SYNTHETIC_PREPROCESSING
from convlens.models.zoo import LoadedModel, wrap
from convlens.runners.evaluate import EvaluationConfig, EvaluationError, run_evaluation
from convlens.runners.store import ResultsStore, SettingsMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


METRICS = ["ebpg", "bbox", "pointing_game", "drop", "increase", "insertion"]


TinyModel = Callable[..., LoadedModel]


@pytest.fixture
def tiny_model(make_model: Callable[..., torch.nn.Module]) -> Callable[..., LoadedModel]:
    """``tiny_model(seed=0, num_classes=4, class_names=CLASS_NAMES)``: the tiny CNN wrapped for 64 x 64 input."""

    def build(seed: int = 0, num_classes: int = 4, class_names: Sequence[str] = CLASS_NAMES) -> LoadedModel:
        return wrap(make_model(seed=seed, num_classes=num_classes), SYNTHETIC_PREPROCESSING, class_names, name="tiny")

    return build


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


def test_records_equal_direct_metric_calls_and_summary_is_their_mean(tmp_path: Path, tiny_model: TinyModel) -> None:
    model = tiny_model()
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


def test_interrupted_run_resumes_to_the_same_tables(tmp_path: Path, tiny_model: TinyModel) -> None:
    model = tiny_model()
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


def test_settings_mismatch_is_refused_unless_overwrite(tmp_path: Path, tiny_model: TinyModel) -> None:
    model = tiny_model()
    run_evaluation(_config(tmp_path, limit=1, methods=["gradcam"]), model=model)
    with pytest.raises(SettingsMismatchError, match="metrics"):
        run_evaluation(_config(tmp_path, limit=1, methods=["gradcam"], metrics=["ebpg"]), model=model)
    result = run_evaluation(_config(tmp_path, limit=1, methods=["gradcam"], metrics=["ebpg"], overwrite=True),
                            model=model)
    assert [s["metric"] for s in result.summary] == ["ebpg", "seconds"]


def test_bad_images_are_listed_escaped_and_skipped(tmp_path: Path, tiny_model: TinyModel) -> None:
    data = tmp_path / "images"
    for i, name in enumerate(["a.png", "b.png"]):
        (data / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), dtype=np.uint8)).save(data / "c" / name)
    (data / "c" / "<script>bad.png").write_bytes(b"\x89PNG broken")
    config = _config(tmp_path / "run", data=str(data), metrics=["drop", "increase"], methods=["gradcam"],
                     targets="predicted", limit=None)
    result = run_evaluation(config, model=tiny_model())
    assert result.n_images == 2 and [b["id"] for b in result.bad_images] == ["c/<script>bad.png"]
    bad_rows = _csv(result.files["bad_images"])
    assert bad_rows[0]["id"] == "c/<script>bad.png" and "not an image" in bad_rows[0]["reason"]
    html = result.files["report"].read_text()
    assert "&lt;script&gt;bad.png" in html and "<script>bad" not in html  # autoescaped
    # a rerun does not retry it and lists it again
    again = run_evaluation(config, model=tiny_model(), progress=lambda *a: pytest.fail("nothing left to do"))
    assert len(again.bad_images) == 1


def test_ground_truth_metric_on_data_without_masks_is_a_clear_error(tmp_path: Path, tiny_model: TinyModel) -> None:
    (tmp_path / "c").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "c" / "a.png")
    with pytest.raises(EvaluationError, match="needs ground-truth boxes or masks"):
        run_evaluation(_config(tmp_path / "run", data=str(tmp_path), metrics=["ebpg"]), model=tiny_model())
    with pytest.raises(EvaluationError, match="data not found"):
        run_evaluation(_config(tmp_path / "run", data=str(tmp_path / "nope")), model=tiny_model())
    with pytest.raises(EvaluationError, match="unknown metric"):
        run_evaluation(_config(tmp_path / "run", metrics=["nope"]), model=tiny_model())


def test_store_writes_atomically(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path, {"a": 1})
    store.put("m", "0000001-x", {"v": 1.5})
    assert json.loads(store.path("m", "0000001-x").read_text()) == {"v": 1.5}
    assert not [p for p in (tmp_path / "records/m").iterdir() if p.name.startswith(".")]  # no temp file left


def test_advise_metrics_come_from_one_avx_run(tmp_path: Path, tiny_model: TinyModel) -> None:
    pytest.importorskip("piq")
    from convlens.metrics.advise_protocol import AVX

    model = tiny_model()
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


def test_folder_labels_are_the_models_class_names(tmp_path: Path, tiny_model: TinyModel) -> None:
    for name in (CLASS_NAMES[2], CLASS_NAMES[0]):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / name / "x.png")
    config = _config(tmp_path / "run", data=str(tmp_path), metrics=["drop"], methods=["gradcam"], limit=None)
    rows = _csv(run_evaluation(config, model=tiny_model()).files["per_image"])
    # sorted folders are [circle..., triangle...]; the explained classes are the model's ids 0 and 2
    assert sorted(int(r["target"]) for r in rows) == [0, 2]
    (tmp_path / "zebra").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "zebra" / "y.png")
    with pytest.raises(EvaluationError, match="model's class names"):
        run_evaluation(_config(tmp_path / "run2", data=str(tmp_path), metrics=["drop"]), model=tiny_model())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_instances_json_is_detected_and_evaluated(tmp_path: Path, tiny_model: TinyModel) -> None:
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
    rows = _csv(run_evaluation(config, model=tiny_model()).files["per_image"])
    assert len(rows) == 1 and rows[0]["id"] == "3" and rows[0]["target"] == "1"  # kite = category 7 = class 1
    assert 0 <= float(rows[0]["ebpg"]) <= 1 and rows[0]["bbox"] != ""
    with pytest.raises(EvaluationError, match="--images"):
        run_evaluation(_config(tmp_path / "r2", data=str(tmp_path / "instances.json")), model=tiny_model())


def test_black_substrate_is_the_models_normalised_black(tmp_path: Path, tiny_model: TinyModel) -> None:
    model = tiny_model()
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


# ----------------------------------------------------------------------------------------------- more literal checks
def _gradcam_maps(model: LoadedModel, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    return GradCAM(model).explain(x, targets).maps.double().numpy()


def test_mprt_and_random_logit_through_the_runner_equal_literal_recomputation(
    tmp_path: Path, tiny_model: TinyModel
) -> None:
    """The sanity checks re-explain with the evaluated method: cascading randomisation (fresh Grad-CAM on a
    copy re-initialised top-down, seed 0 before each layer) and the random-logit class drawn with seed 0."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    model = tiny_model()
    config = _config(tmp_path, methods=["gradcam"], limit=2, n_samples=0,
                     metrics=["mprt_spearman", "mprt_ssim", "random_logit"])
    rows = _csv(run_evaluation(config, model=model).files["per_image"])
    sample = SyntheticShapes(size=2, seed=0).load(1)
    x = SYNTHETIC_PREPROCESSING(sample.image)[None]
    label = sample.labels[0]
    original = _gradcam_maps(model, x, [label])[0]

    def ssim(a: np.ndarray, b: np.ndarray) -> float:
        a, b = ((m - m.min()) / (m.max() - m.min() + 1e-6) for m in (a, b))  # the library's min-max (eps 1e-6)
        return structural_similarity(a, b, data_range=1.0, win_size=7)

    copy_ = wrap(copy.deepcopy(model.module), SYNTHETIC_PREPROCESSING, CLASS_NAMES)
    modules = dict(copy_.module.named_modules())
    spearman, ssims = [], []
    for name in ["fc", "block3.0", "block2.1", "block2.0", "block1.1", "block1.0"]:  # top (logits) down
        torch.manual_seed(0)
        modules[name].reset_parameters()
        randomised = _gradcam_maps(copy_, x, [label])[0]
        if np.ptp(randomised) > 0:
            spearman.append(spearmanr(original.ravel(), randomised.ravel())[0])
        ssims.append(ssim(original, randomised))
    row = next(r for r in rows if r["index"] == "1")
    assert float(row["mprt_spearman"]) == pytest.approx(np.mean(spearman), abs=1e-9)
    assert float(row["mprt_ssim"]) == pytest.approx(np.mean(ssims), abs=1e-6)
    draw = int(np.random.default_rng(0).integers(0, 3))  # uniform over the 3 other classes
    other = draw + (draw >= label)
    expected = ssim(original, _gradcam_maps(model, x, [other])[0])
    assert float(row["random_logit"]) == pytest.approx(expected, abs=1e-6)


def _drop_by_hand(module: torch.nn.Module, x: torch.Tensor, saliency: np.ndarray, target: int, score: str) -> float:
    """Drop% with the top 15 % of the map kept (ties to the first pixel) and the rest set to 0."""
    flat = saliency.ravel()
    k = int(np.floor(0.15 * flat.size + 0.5))
    keep = np.zeros(flat.size, dtype=np.float32)
    keep[np.argsort(-flat, kind="stable")[:k]] = 1.0
    keep_t = torch.from_numpy(keep.reshape(saliency.shape))
    with torch.no_grad():
        scores = [module(v) for v in (x, x * keep_t)]
    y, o = ((torch.sigmoid(s) if score == "sigmoid" else torch.softmax(s, 1))[0, target].item() for s in scores)
    return 100.0 * max(0.0, y - o) / y


def test_sigmoid_metric_score_judges_probabilities_by_their_sigmoid(tmp_path: Path, tiny_model: TinyModel) -> None:
    model = tiny_model()
    config = _config(tmp_path, methods=["gradcam"], limit=2, n_samples=0, metrics=["drop"], metric_score="sigmoid")
    row = _csv(run_evaluation(config, model=model).files["per_image"])[1]
    sample = SyntheticShapes(size=2, seed=0).load(1)
    x = SYNTHETIC_PREPROCESSING(sample.image)[None]
    label = sample.labels[0]
    with torch.no_grad():
        logits = model.module(x)[0]
    assert float(row["probability"]) == pytest.approx(1 / (1 + np.exp(-logits[label].item())), abs=1e-6)
    saliency = _gradcam_maps(model, x, [label])[0]
    expected = _drop_by_hand(model.module, x, saliency, label, "sigmoid")
    assert float(row["drop"]) == pytest.approx(expected, rel=1e-4)  # float32 forwards, batched or not
    assert expected != pytest.approx(_drop_by_hand(model.module, x, saliency, label, "softmax"), rel=1e-2)


def test_method_parameters_reach_the_method(tmp_path: Path, tiny_model: TinyModel) -> None:
    """--param rise.score=sigmoid (what the VOC preset sets) changes RISE's maps; the record is scored on them."""
    from convlens.methods.rise import RISE

    model = tiny_model()
    config = _config(tmp_path, methods=["rise"], limit=1, n_samples=0, metrics=["ebpg"],
                     method_params={"rise": {"score": "sigmoid", "n_masks": 48}})
    row = _csv(run_evaluation(config, model=model).files["per_image"])[0]
    sample = SyntheticShapes(size=1, seed=0).load(0)
    x = SYNTHETIC_PREPROCESSING(sample.image)[None]
    label = sample.labels[0]
    mask = sample.masks[label]

    def ebpg(score: str) -> float:
        maps = RISE(model, score=score, n_masks=48).explain(x, [label]).maps[0].double().numpy().clip(min=0)
        return float(maps[mask].sum() / maps.sum())

    assert float(row["ebpg"]) == pytest.approx(ebpg("sigmoid"), abs=1e-9)
    assert ebpg("sigmoid") != pytest.approx(ebpg("softmax"), abs=1e-6)


def _two_object_voc(root: Path) -> Path:
    """One 64 x 64 VOC image holding a dog (left) and a cat (right)."""
    voc = root / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        voc / "JPEGImages" / "000001.png"
    )
    box = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>8</ymin><xmax>{}</xmax><ymax>40</ymax></bndbox></object>"
    (voc / "Annotations" / "000001.xml").write_text(
        f"<annotation><filename>000001.png</filename>{box.format('dog', 2, 25)}{box.format('cat', 36, 60)}"
        "</annotation>"
    )
    (voc / "ImageSets/Main/test.txt").write_text("000001\n")
    return voc


def test_every_annotated_class_of_an_image_is_explained_and_scored(tmp_path: Path, tiny_model: TinyModel) -> None:
    from convlens.data.voc import VOC_CLASSES

    voc = _two_object_voc(tmp_path)
    model = tiny_model(seed=2, num_classes=20, class_names=VOC_CLASSES)
    config = _config(tmp_path / "run", data=str(voc), methods=["gradcam"], limit=None, n_samples=1,
                     metrics=["ebpg", "drop"])
    rows = _csv(run_evaluation(config, model=model).files["per_image"])
    cat, dog = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")
    assert [(r["target"], r["target_name"]) for r in rows] == [(str(cat), "cat"), (str(dog), "dog")]
    x = SYNTHETIC_PREPROCESSING(Image.open(voc / "JPEGImages/000001.png"))[None]
    boxes = {cat: (36, 60), dog: (2, 25)}
    for row in rows:
        target = int(row["target"])
        saliency = _gradcam_maps(model, x, [target])[0]
        inside = np.zeros((64, 64), dtype=bool)
        inside[7:40, boxes[target][0] - 1 : boxes[target][1]] = True  # VOC corners: 1-based, inclusive
        positive = saliency.clip(min=0)
        assert float(row["ebpg"]) == pytest.approx(positive[inside].sum() / positive.sum(), abs=1e-6)
        expected_drop = _drop_by_hand(model.module, x, saliency, target, "softmax")
        assert float(row["drop"]) == pytest.approx(expected_drop, rel=1e-4)  # float32 forwards, batched or not
    # the report shows one overlay and one ground-truth mask per explained class
    overlays = {p.name.split("_")[-1] for p in (tmp_path / "run/samples/gradcam").glob("*.png")}
    assert overlays == {f"t{cat}.png", f"t{dog}.png"}
    assert len(list((tmp_path / "run/samples/input").glob("*_mask*.png"))) == 2


class _MaskShare(Metric):
    """A metric of a family the runner has never seen: the fraction of the image the ground truth covers."""

    name = "mask_share"
    requires = frozenset({"mask"})

    def evaluate(self, context: MetricContext) -> MetricValue:
        return MetricValue(float("nan") if context.mask is None else float(context.mask.float().mean()))


def test_a_new_metric_needs_only_evaluate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: TinyModel
) -> None:
    module = types.ModuleType("convlens_test_metrics")
    module._MaskShare = _MaskShare  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "convlens_test_metrics", module)
    monkeypatch.setitem(REGISTERED_METRICS, "mask_share", MetricSpec("convlens_test_metrics:_MaskShare"))
    config = _config(tmp_path, methods=["gradcam"], limit=2, n_samples=0, metrics=["mask_share"])
    rows = _csv(run_evaluation(config, model=tiny_model()).files["per_image"])
    for i, row in enumerate(rows):
        sample = SyntheticShapes(size=2, seed=0).load(i)
        assert float(row["mask_share"]) == pytest.approx(sample.masks[sample.labels[0]].sum() / 64**2)


def test_item_evaluator_pickles_and_gives_the_same_records(tmp_path: Path, tiny_model: TinyModel) -> None:
    """The unit of work an engine ships to its workers: the evaluator pickles once and evaluates any item."""
    import pickle

    from convlens.runners.evaluate import build_evaluation
    from convlens.runners.evaluate_item import WorkItem

    config = _config(tmp_path, methods=["gradcam", "rise"], method_params={"rise": {"n_masks": 32}}, limit=2,
                     metrics=["ebpg", "insertion", "random_logit"])
    setup = build_evaluation(config, model=tiny_model())
    item = WorkItem(1, "k", "id-1", ("gradcam", "rise"), keep_samples=True)
    local = setup.evaluator(item)
    remote = pickle.loads(pickle.dumps(setup.evaluator))(item)
    for method in ("gradcam", "rise"):
        a, b = local.records[method], remote.records[method]
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
        np.testing.assert_array_equal(local.samples.maps[method], remote.samples.maps[method])  # type: ignore[union-attr]
    assert not list(tmp_path.iterdir())  # building and evaluating write nothing

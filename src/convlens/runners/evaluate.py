"""Dataset-level evaluation: explain every image with every method, score every metric, resume after a kill.

:func:`run_evaluation` takes an :class:`EvaluationConfig` and writes, under ``out``:

* ``records/`` — one JSON record per (method, image), written atomically (:mod:`convlens.runners.store`);
  a killed run, rerun with the same settings, skips what is done and ends with the same tables;
* ``per_image.csv`` — one row per (image, target class, method) with every metric;
* ``summary.csv`` / ``summary.md`` — mean and 95 % percentile-bootstrap CI per method and metric;
* ``bad_images.csv`` — images that could not be used, with the reason (they are skipped, not fatal);
* ``report.html`` — bar charts, insertion/deletion curves, sample overlays (``reports.evaluate_report``).

The explained class ("target") is each ground-truth class of the image (``targets="label"``, the SISE
protocol: one explanation per annotated class) or the predicted class (``targets="predicted"``).

Metric families and what each is given (``convlens.metrics.registry`` names):

* ground truth (ebpg, miou, bbox, pointing_game): the map at input resolution and the target class's
  preprocessed mask (NaN when the target has no annotation, e.g. a wrongly predicted class);
* model truth (drop, increase, insertion, deletion): the model, the preprocessed image, the map; scores are
  ``--metric-score`` probabilities (softmax; sigmoid for multi-label models); curves are kept for the report;
* sanity (mprt_*, random_logit): a factory that rebuilds the same method on randomised copies of the model;
  one randomisation cascade per (image, class) serves every ``mprt_*`` similarity;
* ADVISE (avx, class_sensitivity, avx_*): one AVX protocol run per (image, class) with ``M1`` the target's
  min-max normalised map and ``M2`` the map of the most probable *other* class (the runner-up; with
  ``targets="predicted"`` exactly the code's top-1 / top-2 pair), on the image the model sees.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from convlens.core.targets import adapt_output
from convlens.data.base import ImageDataset, Sample, preprocess_mask
from convlens.methods.base import Explainer
from convlens.methods.registry import METHODS, create, get_method
from convlens.metrics.base import Direction, MetricAccumulator, MetricCategory
from convlens.metrics.registry import create_metric, get_metric_spec, metric_class
from convlens.models.images import ImageLoadError
from convlens.models.zoo import LoadedModel
from convlens.runners.store import ResultsStore, atomic_write_text, record_key

__all__ = [
    "PRESETS",
    "EvaluationConfig",
    "EvaluationResult",
    "build_dataset",
    "load_evaluation_model",
    "run_evaluation",
    "summarise",
]

logger = logging.getLogger("convlens.evaluate")

# the SISE paper's Table 1 protocol (spec 1.12): VOC 2007 test boxes, each annotated class explained
PRESETS: dict[str, dict[str, Any]] = {
    "sise-voc2007": {
        "data_format": "voc",
        "split": "test",
        "metrics": ["ebpg", "miou", "bbox", "drop", "increase"],
        "methods": ["gradcam", "gradcampp", "rise", "scorecam", "sise"],
        "targets": "label",
        "metric_score": "sigmoid",  # TorchRay's VOC models are multi-label (one sigmoid per class)
        # sampling methods score the explained class by its sigmoid too (Grad-CAM family: the logit)
        "method_params": {"rise": {"score": "sigmoid"}, "sise": {"score": "sigmoid"}, "adasise": {"score": "sigmoid"}},
        "needs_weights": True,
    },
}

CURVE_METRICS = ("insertion", "deletion")


@dataclass
class EvaluationConfig:
    """Everything that defines an evaluation run (see the ``convlens evaluate`` options)."""

    model: str
    methods: Sequence[str]
    data: str
    metrics: Sequence[str]
    out: Path
    weights: str | None = None
    data_format: Literal["auto", "synthetic", "folder", "csv", "voc", "xml", "coco"] = "auto"
    annotations: str | None = None
    images: str | None = None
    split: str = "test"
    limit: int | None = None
    synthetic_seed: int = 0
    targets: Literal["label", "predicted"] = "label"
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_score: Literal["softmax", "sigmoid", "logit"] = "softmax"
    batch_size: int = 64
    device: str = "cpu"
    n_samples: int = 4
    overwrite: bool = False
    preset: str | None = None

    def settings(self, dataset: ImageDataset) -> dict[str, Any]:
        """What determines the results (compared when resuming)."""
        return {
            "model": self.model, "weights": self.weights, "methods": list(self.methods),
            "method_params": self.method_params, "metrics": list(self.metrics),
            "metric_params": self.metric_params, "metric_score": self.metric_score, "targets": self.targets,
            "data": dataset.describe(), "limit": self.limit, "batch_size": self.batch_size,
        }


@dataclass
class EvaluationResult:
    """What a run produced: the summary rows, counts, and the written files."""

    summary: list[dict[str, Any]]
    n_images: int
    n_records: int
    bad_images: list[dict[str, Any]]
    files: dict[str, Path]
    interrupted: bool = False


class EvaluationError(ValueError):
    """A user error in the evaluation settings (one clear message)."""


# ----------------------------------------------------------------------------------------------- setup
def load_evaluation_model(
    name: str, weights: str | None = None, class_names: Sequence[str] | None = None
) -> LoadedModel:
    """``synthetic-vgg`` / ``synthetic-resnet`` (committed weights) or any :func:`convlens.models.load` name."""
    from convlens.data.synthetic_models import SYNTHETIC_MODELS, load_synthetic_model

    if name in SYNTHETIC_MODELS:
        return load_synthetic_model(name, weights)
    from convlens.models import load

    return load(name, weights=weights, class_names=class_names)


def build_dataset(config: EvaluationConfig) -> ImageDataset:
    """The dataset named by ``config.data`` / ``config.data_format`` (clear errors for missing data)."""
    fmt = config.data_format
    if config.data == "synthetic" or fmt == "synthetic":
        from convlens.data.synthetic import SyntheticShapes

        return SyntheticShapes(size=config.limit or 50, seed=config.synthetic_seed, split="test")
    path = Path(config.data)
    if not path.exists():
        raise EvaluationError(f"data not found: {path}")
    if fmt == "auto":
        from convlens.data.voc import find_voc2007

        if path.is_file() and path.suffix.lower() == ".csv":
            fmt = "csv"
        elif path.is_file() and path.suffix.lower() == ".json":
            fmt = "coco"
        elif path.is_dir() and find_voc2007(path) is not None:
            fmt = "voc"
        else:
            fmt = "folder"
    try:
        if fmt == "voc":
            from convlens.data.voc import VOCDetection

            return VOCDetection(path, split=config.split)
        if fmt == "csv":
            from convlens.data.folders import CSVImageDataset

            return CSVImageDataset(path, root=config.images)
        if fmt == "coco":
            from convlens.data.coco import COCOInstances

            if config.images is None:
                raise EvaluationError("COCO data need --images DIR (the folder of the images named in the JSON)")
            return COCOInstances(path, config.images)
        if fmt == "xml":
            from convlens.data.voc import XMLBoxDataset

            if config.annotations is None or config.images is None:
                raise EvaluationError("XML box data need --images DIR and --annotations DIR (PATH = synset mapping)")
            return XMLBoxDataset(config.images, config.annotations, path)
        if fmt == "folder":
            from convlens.data.folders import ImageFolder

            return ImageFolder(path)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        if isinstance(exc, EvaluationError):
            raise
        raise EvaluationError(str(exc)) from exc
    raise EvaluationError(f"unknown data format {fmt!r}")


def _check_settings(config: EvaluationConfig, dataset: ImageDataset) -> None:
    if not config.methods:
        raise EvaluationError("no methods given")
    if not config.metrics:
        raise EvaluationError("no metrics given")
    for method in config.methods:
        if method not in METHODS:
            try:
                get_method(method)
            except ValueError as exc:
                raise EvaluationError(str(exc)) from exc
    for metric in config.metrics:
        try:
            get_metric_spec(metric)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from exc
        if metric_class(metric).category is MetricCategory.GROUND_TRUTH and not dataset.has_masks:
            raise EvaluationError(
                f"metric {metric!r} needs ground-truth boxes or masks, and {type(dataset).__name__} has none "
                "(use VOC/XML/COCO data or `--data synthetic`, or model-truth metrics such as drop, insertion)"
            )
    if config.targets == "label" and isinstance(dataset, ImageDataset) and not dataset.class_names:
        logger.warning("the dataset has no labels: explaining the predicted class of every image")
    if config.limit is not None and config.limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {config.limit}")


def _align_labels(dataset: ImageDataset, loaded: LoadedModel) -> ImageDataset:
    """Folder/CSV labels are class *names*: re-index them by the model's class list (folder ``tabby`` must be
    the model's ``tabby``), so that the explained class is the model's own class id."""
    from convlens.data.folders import CSVImageDataset, ImageFolder

    if not loaded.class_names or dataset.class_names == loaded.class_names[: len(dataset.class_names)]:
        return dataset
    try:
        if isinstance(dataset, ImageFolder) and dataset.labelled:
            return ImageFolder(dataset.root, class_names=loaded.class_names)
        if isinstance(dataset, CSVImageDataset):
            return CSVImageDataset(dataset.csv_path, root=dataset.root, class_names=loaded.class_names)
    except ValueError as exc:
        raise EvaluationError(
            f"the data's labels must be the model's class names or ids ({exc}); or use --targets predicted"
        ) from exc
    return dataset


def _metric_kwargs(config: EvaluationConfig, name: str) -> dict[str, Any]:
    params = dict(config.metric_params.get(name, {}))
    category = metric_class(name).category
    if category is MetricCategory.MODEL_TRUTH:
        params.setdefault("score", config.metric_score)
        params.setdefault("batch_size", config.batch_size)
    if name == "avx":  # AVXOptions fields given as avx.<field>=VALUE
        from dataclasses import fields

        from convlens.metrics.advise_protocol import AVXOptions

        option_names = {f.name for f in fields(AVXOptions)}
        options = {k: params.pop(k) for k in list(params) if k in option_names}
        if options:
            params["options"] = AVXOptions(**options)
        params.setdefault("batch_size", config.batch_size)
    return params


# ----------------------------------------------------------------------------------------------- one image
@dataclass
class _Prepared:
    sample: Sample
    x: torch.Tensor  # (1, C, H, W) on the device
    display: Any  # PIL image the model sees
    masks: dict[int, np.ndarray]  # preprocessed ground truth per class
    probabilities: torch.Tensor  # (classes,)
    targets: list[int]


def _prepare(sample: Sample, loaded: LoadedModel, config: EvaluationConfig, device: torch.device) -> _Prepared:
    x = loaded.preprocessing(sample.image)[None].to(device)
    with torch.inference_mode():
        logits = adapt_output(loaded.module(x)).float()[0]
    probabilities = (torch.sigmoid(logits) if config.metric_score == "sigmoid" else torch.softmax(logits, 0)).cpu()
    targets = list(sample.labels) if config.targets == "label" and sample.labels else [int(logits.argmax())]
    masks = {c: preprocess_mask(m, loaded.preprocessing) for c, m in sample.masks.items()}
    return _Prepared(sample, x, loaded.preprocessing.display(sample.image), masks, probabilities, targets)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def _score_metrics(
    prepared: _Prepared,
    maps: torch.Tensor,
    method: str,
    method_kwargs: dict[str, Any],
    loaded: LoadedModel,
    metrics: dict[str, Any],
    metric_names: Sequence[str],
    explainer: Explainer,
) -> tuple[list[dict[str, float | None]], list[dict[str, list[float]]]]:
    """Per target: {metric: value} and {curve metric: curve}."""
    model = loaded.module
    values: list[dict[str, float | None]] = [{} for _ in prepared.targets]
    curves: list[dict[str, list[float]]] = [{} for _ in prepared.targets]
    randomisation_cache: dict[tuple[Any, ...], Any] = {}

    def make_explainer(m: nn.Module) -> Explainer:
        return create(method, m, **method_kwargs)

    for t_index, target in enumerate(prepared.targets):
        saliency = maps[t_index : t_index + 1].cpu()
        avx_result = None
        for name in metric_names:
            metric = metrics[name]
            category = metric.category
            if category is MetricCategory.GROUND_TRUTH:
                mask = prepared.masks.get(target)
                value = float("nan") if mask is None else float(metric(saliency, torch.from_numpy(mask)[None])[0])
            elif category is MetricCategory.MODEL_TRUTH:
                if hasattr(metric, "curve"):
                    curve = metric.curve(model, prepared.x, saliency, [target])
                    value = float(curve.auc[0])
                    curves[t_index][name] = [round(float(v), 6) for v in curve.scores[0]]
                else:
                    value = float(metric(model, prepared.x, saliency, [target])[0])
            elif category is MetricCategory.SANITY:
                if hasattr(metric, "run"):  # randomisation: one cascade serves every similarity
                    cache_key = (metric.order, tuple(metric.layers or ()), metric.max_steps, metric.seed)
                    if cache_key not in randomisation_cache:
                        randomisation_cache[cache_key] = metric.run(
                            make_explainer, model, prepared.x, [target], saliency
                        )
                    value = float(randomisation_cache[cache_key].aggregate(metric.similarity, metric.aggregate)[0])
                else:
                    value = float(metric(make_explainer, model, prepared.x, [target], saliency)[0])
            elif category is MetricCategory.ADVISE:
                if avx_result is None:
                    avx_result = _avx_result(prepared, saliency, target, explainer, loaded, metrics["_avx"])
                value = _advise_value(name, metric, avx_result)
            else:
                raise ValueError(f"metric {name!r} has an unknown category {category!r}")
            values[t_index][name] = _finite(value)
        randomisation_cache.clear()
    return values, curves


def _avx_result(
    prepared: _Prepared, saliency: torch.Tensor, target: int, explainer: Explainer, loaded: LoadedModel, avx: Any
) -> Any:
    """The ADVISE (AVX) protocol for one explained class: its min-max normalised map ``M1`` and the map ``M2``
    of the runner-up class (the most probable class other than the explained one), on the image the model
    sees (uint8), with the model's own preprocessing."""
    from convlens.core.maps import minmax_normalize

    probabilities = prepared.probabilities.clone()
    probabilities[target] = -math.inf
    runner_up = int(probabilities.argmax())
    map_top2 = explainer.explain(prepared.x, [runner_up]).maps.detach().float().cpu()
    image = np.array(prepared.display, dtype=np.uint8)  # a writable copy
    return avx(loaded, image, minmax_normalize(saliency.float()), minmax_normalize(map_top2), class_id=target)


def _advise_value(name: str, metric: Any, result: Any) -> float:
    """One number of an :class:`~convlens.metrics.advise_protocol.AVXResult` for metric ``name``."""
    if name == "avx":
        return float(result.avx[0])
    if name == "class_sensitivity":
        return float(result.class_sensitivity[0])
    return float(torch.as_tensor(metric(result)).double().reshape(-1)[0])


# ----------------------------------------------------------------------------------------------- run
def run_evaluation(
    config: EvaluationConfig,
    model: LoadedModel | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    show_progress: bool = False,
    stop_after: int | None = None,
) -> EvaluationResult:
    """Run (or resume) an evaluation; returns the summary and the written files.

    Args:
        config: the settings.
        model: an already loaded model to use instead of loading ``config.model`` by name (its name is
            still what the settings record).
        progress: called as ``progress(done, total, image_id)`` after each image.
        show_progress: draw a Rich progress bar with ETA on stderr.
        stop_after: process at most this many new images, then stop as if interrupted (tests, batches).
    """
    dataset = build_dataset(config)
    _check_settings(config, dataset)
    try:
        # annotated datasets (VOC, COCO, XML, synthetic) define the class list of models trained on them
        names = dataset.class_names if dataset.has_masks and dataset.class_names else None
        loaded = model or load_evaluation_model(config.model, config.weights, names)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from exc
    if config.targets == "label":
        dataset = _align_labels(dataset, loaded)
    device = torch.device(config.device)
    loaded.module.to(device).eval()
    if dataset.class_names and loaded.class_names and len(dataset.class_names) > len(loaded.class_names):
        raise EvaluationError(
            f"the data have {len(dataset.class_names)} classes but the model has {len(loaded.class_names)} outputs"
        )
    method_kwargs = {m: {"batch_size": config.batch_size} | config.method_params.get(m, {}) for m in config.methods}
    explainers: dict[str, Explainer] = {}
    for method in config.methods:
        try:
            explainers[method] = create(method, loaded, **method_kwargs[method])
        except (TypeError, ValueError) as exc:
            raise EvaluationError(f"method {method}: {exc}") from exc
    metrics: dict[str, Any] = {}
    for name in config.metrics:
        try:
            metrics[name] = create_metric(name, **_metric_kwargs(config, name))
        except (TypeError, ValueError) as exc:
            raise EvaluationError(f"metric {name}: {exc}") from exc
    black = loaded.preprocessing.normalize(torch.zeros(3, 1, 1))
    for metric in metrics.values():  # "black" = a black pixel in the model's input space
        for attribute in ("substrate", "baseline"):
            if isinstance(getattr(metric, attribute, None), str) and getattr(metric, attribute) == "black":
                setattr(metric, attribute, black)
    if any(metrics[n].category is MetricCategory.ADVISE for n in config.metrics):
        # every ADVISE number comes from one AVX protocol run per explained class
        metrics["_avx"] = metrics["avx"] if "avx" in metrics else create_metric("avx", **_metric_kwargs(config, "avx"))

    out = Path(config.out)
    store = ResultsStore(out, config.settings(dataset), overwrite=config.overwrite)
    ids = dataset.sample_ids()
    n_total = min(len(ids), config.limit) if config.limit else len(ids)
    keys = [record_key(i, ids[i]) for i in range(n_total)]
    pending = [
        i for i in range(n_total)
        if not store.is_bad(keys[i]) and not all(store.has(m, keys[i]) for m in config.methods)
    ]
    samples_dir = out / "samples"
    done_before = n_total - len(pending)
    processed = 0
    interrupted = False

    bar = None
    if show_progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]evaluate[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.description}"),
            transient=False, console=Console(stderr=True),
        )
        bar.start()
        task = bar.add_task("", total=n_total, completed=done_before)
    try:
        for index in pending:
            if stop_after is not None and processed >= stop_after:
                interrupted = True
                break
            key = keys[index]
            try:
                sample = dataset.load(index)
            except ImageLoadError as exc:
                store.mark_bad(key, ids[index], str(exc))
                logger.warning("skipping %s: %s", ids[index], exc)
            else:
                prepared = _prepare(sample, loaded, config, device)
                for method in config.methods:
                    if store.has(method, key):
                        continue
                    record = _evaluate_method(
                        prepared, explainers[method], method, method_kwargs[method], loaded, metrics, config.metrics
                    )
                    if index < config.n_samples:
                        _save_sample(samples_dir, key, method, prepared, record.pop("_maps"))
                    record.pop("_maps", None)
                    store.put(method, key, record | {"key": key, "index": index, "id": ids[index]})
                if index < config.n_samples:
                    _save_input(samples_dir, key, prepared)
            processed += 1
            if bar is not None:
                bar.update(task, advance=1, description=ids[index][-40:])
            if progress is not None:
                progress(done_before + processed, n_total, ids[index])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if bar is not None:
            bar.stop()
    return _finish(config, store, dataset, loaded, n_total, interrupted)


def _evaluate_method(
    prepared: _Prepared,
    explainer: Explainer,
    method: str,
    method_kwargs: dict[str, Any],
    loaded: LoadedModel,
    metrics: dict[str, Any],
    metric_names: Sequence[str],
) -> dict[str, Any]:
    k = len(prepared.targets)
    start = time.perf_counter()
    explanation = explainer.explain(prepared.x.expand(k, -1, -1, -1), prepared.targets)
    seconds = time.perf_counter() - start
    maps = explanation.maps.detach().float()
    values, curves = _score_metrics(prepared, maps, method, method_kwargs, loaded, metrics, metric_names, explainer)
    names = loaded.class_names
    rows = []
    predicted = int(prepared.probabilities.argmax())
    for t_index, target in enumerate(prepared.targets):
        rows.append({
            "target": target,
            "target_name": names[target] if target < len(names) else str(target),
            "label": prepared.sample.labels,
            "predicted": predicted,
            "correct": (predicted in prepared.sample.labels) if prepared.sample.labels else None,
            "probability": round(float(prepared.probabilities[target]), 6),
            "has_mask": target in prepared.masks,
            "metrics": values[t_index],
            "curves": curves[t_index],
        })
    return {
        "method": method, "seconds": seconds / k, "forward_passes": explanation.forward_passes,
        "targets": rows, "_maps": maps.cpu(),
    }


def _save_input(directory: Path, key: str, prepared: _Prepared) -> None:
    path = directory / "input" / f"{key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    prepared.display.save(path)
    for target in prepared.targets:
        if target in prepared.masks:
            from PIL import Image

            Image.fromarray(np.where(prepared.masks[target], 255, 0).astype(np.uint8)).save(
                directory / "input" / f"{key}_mask{target}.png"
            )


def _save_sample(directory: Path, key: str, method: str, prepared: _Prepared, maps: torch.Tensor) -> None:
    from convlens.core.maps import minmax_normalize
    from convlens.reports.overlay import overlay_map

    folder = directory / method
    folder.mkdir(parents=True, exist_ok=True)
    normalised = minmax_normalize(maps.float()).numpy()
    for t_index, target in enumerate(prepared.targets):
        overlay_map(prepared.display, normalised[t_index]).save(folder / f"{key}_t{target}.png")


# ----------------------------------------------------------------------------------------------- tables
def _rows(store: ResultsStore, methods: Sequence[str], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        for record in store.records(method):
            for target in record["targets"]:
                row = {
                    "id": record["id"], "index": record["index"], "method": method, "target": target["target"],
                    "target_name": target["target_name"], "predicted": target["predicted"],
                    "correct": target["correct"], "probability": target["probability"],
                    "seconds": round(record["seconds"], 6),
                }
                for name in metric_names:
                    value = target["metrics"].get(name)
                    row[name] = float("nan") if value is None else value
                rows.append(row)
    rows.sort(key=lambda r: (r["index"], r["target"], methods.index(r["method"])))
    return rows


def summarise(rows: list[dict[str, Any]], methods: Sequence[str], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, 95 % bootstrap CI, n and NaN count per (method, metric), in the given orders."""
    summary = []
    for method in methods:
        for name in [*metric_names, "seconds"]:
            accumulator = MetricAccumulator(name)
            for row in rows:
                if row["method"] == method:
                    accumulator.update(row[name])
            stats = accumulator.summary()
            direction = Direction.LOWER if name == "seconds" else metric_class(name).direction
            summary.append({"method": method, "metric": name, "direction": direction.value, **stats})
    return summary


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_markdown(summary: list[dict[str, Any]], methods: Sequence[str], metric_names: Sequence[str]) -> str:
    """Methods as rows, metrics as columns: ``mean [CI low, CI high]`` (percent metrics as published)."""
    arrows = {"higher": "↑", "lower": "↓"}
    columns = [*metric_names, "seconds"]
    index = {(s["method"], s["metric"]): s for s in summary}
    header = "| method | " + " | ".join(
        f"{c} {arrows[index[(methods[0], c)]['direction']]}" for c in columns
    ) + " | n |"
    lines = [header, "|---" * (len(columns) + 2) + "|"]
    for method in methods:
        cells = []
        for c in columns:
            s = index[(method, c)]
            digits = 3 if c == "seconds" else (2 if c in ("drop", "increase") else 4)
            cells.append(f"{_fmt(s['mean'], digits)} [{_fmt(s['ci_low'], digits)}, {_fmt(s['ci_high'], digits)}]")
        n = index[(method, columns[0])]["n"] + index[(method, columns[0])]["nan_count"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _finish(
    config: EvaluationConfig, store: ResultsStore, dataset: ImageDataset, loaded: LoadedModel, n_total: int,
    interrupted: bool,
) -> EvaluationResult:
    out = Path(config.out)
    methods, metric_names = list(config.methods), list(config.metrics)
    rows = _rows(store, methods, metric_names)
    summary = summarise(rows, methods, metric_names)
    files = {
        "per_image": out / "per_image.csv", "summary_csv": out / "summary.csv", "summary_md": out / "summary.md",
        "bad_images": out / "bad_images.csv", "report": out / "report.html",
    }
    _write_csv(files["per_image"], rows, [
        "id", "index", "method", "target", "target_name", "predicted", "correct", "probability", "seconds",
        *metric_names,
    ])
    _write_csv(files["summary_csv"], summary, ["method", "metric", "direction", "mean", "ci_low", "ci_high", "n",
                                               "nan_count"])
    bad = store.bad()
    _write_csv(files["bad_images"], bad, ["id", "reason"])
    done_images = len({r["index"] for r in rows})
    header = (
        f"# convlens evaluate\n\nmodel `{config.model}`, data `{config.data}` ({done_images} images evaluated, "
        f"{len(bad)} skipped as unusable), targets: {config.targets}. Mean [95 % bootstrap CI] per method; "
        "↑ higher is better, ↓ lower is better; drop/increase in %.\n\n"
    )
    atomic_write_text(files["summary_md"], header + summary_markdown(summary, methods, metric_names))
    from convlens.reports.evaluate_report import write_evaluation_report

    write_evaluation_report(
        files["report"], config=asdict(config) | {"out": str(config.out)}, summary=summary, rows=rows,
        curves=_mean_curves(store, methods), samples_dir=out / "samples", methods=methods,
        metric_names=metric_names, bad_images=bad, model_info={"name": loaded.name, "source": loaded.source},
    )
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return EvaluationResult(summary, done_images, len(rows), bad, files, interrupted)


def _mean_curves(store: ResultsStore, methods: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Mean insertion/deletion curve per method (over all targets)."""
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, dict[str, int]] = {}
    for method in methods:
        for record in store.records(method):
            for target in record["targets"]:
                for name, curve in target.get("curves", {}).items():
                    values = np.asarray(curve, dtype=np.float64)
                    current = sums.setdefault(name, {}).get(method)
                    if current is not None and current.shape != values.shape:
                        continue  # curves of differently sized inputs cannot be averaged point-wise
                    sums[name][method] = values if current is None else current + values
                    counts.setdefault(name, {})[method] = counts.get(name, {}).get(method, 0) + 1
    return {
        name: {m: (total / counts[name][m]).tolist() for m, total in per_method.items()}
        for name, per_method in sums.items()
    }

"""``convlens evaluate``: score explanation methods on a dataset with the papers' metrics.

The command function is registered on the Typer ``app`` in :mod:`convlens.cli.main`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from convlens.cli.common import CliError, fail, old_spelling, parse_literal, split_list
from convlens.cli.engines import (
    AddressOption,
    EngineChoice,
    EngineOption,
    GpusOption,
    ThreadsOption,
    WorkersOption,
    engine_session,
    ray_options,
)
from convlens.cli.explain import DEFAULT_BATCH_SIZE, parse_params
from convlens.runners.evaluate import PRESETS, Engine, EvaluationConfig, EvaluationError, run_evaluation
from convlens.runners.ray_engine import RayEngineError  # no Ray import: Ray loads only for --engine ray
from convlens.runners.store import SettingsMismatchError

__all__ = ["DEFAULT_METRICS", "evaluate", "parse_metric_params"]

DEFAULT_METRICS = ("ebpg", "miou", "bbox", "pointing_game", "drop", "increase", "insertion", "deletion")
MODEL_TRUTH_METRICS = ("drop", "increase", "insertion", "deletion")

console = Console(stderr=True)


def parse_metric_params(items: list[str], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """``["insertion.step=32", "pointing_game.tolerance=15"]`` -> per-metric keyword arguments (validated)."""
    from convlens.metrics.registry import metric_class

    per_metric: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        metric, dot, name = key.partition(".")
        if not sep or not dot:
            raise CliError(f"--metric-param {item!r}: expected METRIC.KEY=VALUE")
        if metric not in metrics:
            raise CliError(f"--metric-param {item!r}: metric {metric!r} is not among --metrics {','.join(metrics)}")
        accepted = metric_class(metric).parameters()
        if name not in accepted:
            known = ", ".join(sorted(accepted)) or "no parameters"
            raise CliError(f"--metric-param {item!r}: {metric} accepts {known}")
        per_metric.setdefault(metric, {})[name] = parse_literal(value)
    return per_metric


def evaluate(
    data: Annotated[
        str | None, typer.Option(help="`synthetic` (exact-ground-truth benchmark) or a path: image folder, CSV, "
                                      "VOC2007 folder, COCO instances JSON, synset file for XML boxes.")
    ] = None,
    model: Annotated[str, typer.Option(help="synthetic-vgg, synthetic-resnet, or any `convlens models` name.")] = (
        "synthetic-vgg"
    ),
    weights: Annotated[str | None, typer.Option(help="Local state_dict for the model (weights-only load).")] = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods (see `convlens methods`) [default: the preset's, else gradcam].")] = None,
    metrics: Annotated[
        str | None, typer.Option(help=f"Comma-separated metrics [default: {','.join(DEFAULT_METRICS)}].")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder (records, tables, report.html).")] = Path("out/evaluate"),
    preset: Annotated[
        str | None, typer.Option(help="sise-voc2007: the SISE paper's Table 1 protocol (VOC 2007 test boxes).")
    ] = None,
    data_format: Annotated[str, typer.Option(help="auto | folder | csv | voc | xml | coco | synthetic.")] = "auto",
    images: Annotated[str | None, typer.Option(help="Image folder (COCO, XML boxes, CSV root).")] = None,
    annotations: Annotated[str | None, typer.Option(help="XML annotation folder (ImageNet-style boxes).")] = None,
    split: Annotated[str, typer.Option(help="VOC split list (ImageSets/Main/<split>.txt).")] = "test",
    limit: Annotated[
        int | None, typer.Option(help="Evaluate the first N images (synthetic: N images, default 50).")
    ] = None,
    target: Annotated[str | None, typer.Option(
        help="label (each annotated class) or predicted (the model's top class).", show_default="label")] = None,
    param: Annotated[list[str] | None, typer.Option(
        metavar="[METHOD.]KEY=VALUE", help="A method parameter; KEY=VALUE sets it for every selected method that "
                                           "has it (repeatable).")] = None,
    metric_param: Annotated[list[str] | None, typer.Option(
        metavar="METRIC.KEY=VALUE", help="A metric parameter (repeatable).")] = None,
    metric_score: Annotated[str | None, typer.Option(help="Model-truth metrics' score: softmax|sigmoid|logit.")] = None,
    batch_size: Annotated[int, typer.Option(help="Masked inputs per forward pass.")] = DEFAULT_BATCH_SIZE,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    samples: Annotated[int, typer.Option(help="Overlays shown in the report for the first N images.")] = 4,
    overwrite: Annotated[bool, typer.Option(help="Discard a previous convlens run in --out made with other "
                                            "settings (its records, overlays, plots; nothing else).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with ETA.")] = True,
    engine: EngineOption = "embedded",
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = None,
    threads_per_worker: ThreadsOption = 1,
    ray_address: AddressOption = None,
    method: Annotated[str | None, typer.Option("--method", hidden=True, help="Old spelling of --methods.")] = None,
    targets: Annotated[str | None, typer.Option("--targets", hidden=True, help="Old spelling of --target.")] = None,
) -> None:
    """Evaluate methods on a dataset: per-image CSV, summary (mean, 95 % CI) as Markdown/CSV/HTML; resumable."""
    choice = _engine_choice(engine, workers, gpus_per_worker, threads_per_worker, ray_address, device)
    chosen = _preset(preset)
    if data is None:
        _no_data(preset, chosen)
    methods = old_spelling(console, "--methods", methods, "--method", method, None)
    target = old_spelling(console, "--target", target, "--targets", targets, "label")
    method_list = split_list(methods) or ([m for m in chosen["methods"] if _registered(m)] if chosen else ["gradcam"])
    metric_list = split_list(metrics) or _default_metrics(chosen, str(data), data_format)
    if chosen is not None:
        _check_preset_weights(str(preset), chosen, weights)
        data_format = chosen["data_format"] if data_format == "auto" else data_format
        split = chosen.get("split", split)
    method_params, metric_params = _parameters(param or [], metric_param or [], method_list, metric_list, chosen)
    config = EvaluationConfig(
        model=model, methods=method_list, data=str(data), metrics=metric_list, out=out, weights=weights,
        data_format=data_format, annotations=annotations, images=images, split=split, limit=limit,  # type: ignore[arg-type]
        targets=target, method_params=method_params, metric_params=metric_params,  # type: ignore[arg-type]
        metric_score=metric_score or (chosen["metric_score"] if chosen else "softmax"),  # type: ignore[arg-type]
        batch_size=batch_size, device=choice.driver_device, n_samples=samples, overwrite=overwrite, preset=preset,
    )
    _run(config, progress, choice)


def _preset(name: str | None) -> dict[str, Any] | None:
    chosen = PRESETS.get(name) if name else None
    if name and chosen is None:
        fail(console, f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return chosen


def _no_data(preset: str | None, chosen: dict[str, Any] | None) -> None:
    if chosen is not None:
        fail(console,
            f"the {preset} preset needs the PASCAL VOC 2007 test set on disk: pass --data PATH to the folder "
            "extracted from VOCtest_06-Nov-2007.tar (VOCdevkit/VOC2007 with Annotations/, JPEGImages/, "
            "ImageSets/Main/test.txt), and --model vgg16|resnet50 --weights PATH to the VOC-trained weights"
        )
    fail(console, "no data: pass --data synthetic or --data PATH (see `convlens evaluate --help`)")


def _default_metrics(chosen: dict[str, Any] | None, data: str, data_format: str) -> list[str]:
    if chosen is not None:
        return list(chosen["metrics"])
    annotated = data == "synthetic" or _has_masks_format(data, data_format)
    return list(DEFAULT_METRICS) if annotated else list(MODEL_TRUTH_METRICS)


def _check_preset_weights(preset: str, chosen: dict[str, Any], weights: str | None) -> None:
    if chosen.get("needs_weights") and weights is None:
        fail(console,
            f"the {preset} preset evaluates VOC-trained classifiers: pass --model vgg16|resnet50 and --weights "
            "PATH (a state_dict with 20 outputs, e.g. TorchRay's VOC models converted to a plain state_dict)"
        )


def _parameters(
    method_items: list[str], metric_items: list[str], methods: list[str], metrics: list[str],
    chosen: dict[str, Any] | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per-method and per-metric keyword arguments; a preset's method parameters under the user's."""
    try:
        method_params = parse_params(method_items, methods)
        metric_params = parse_metric_params(metric_items, metrics)
    except (CliError, ValueError) as exc:  # ValueError: unknown method or metric names
        fail(console, str(exc))
    for method, defaults in (chosen or {}).get("method_params", {}).items():
        if method in method_params:
            method_params[method] = defaults | method_params[method]
    return {k: v for k, v in method_params.items() if v}, metric_params


def _run(config: EvaluationConfig, progress: bool, choice: EngineChoice) -> None:
    try:
        with engine_session(choice):
            result = run_evaluation(config, show_progress=progress, **_engine(choice))
    except (EvaluationError, SettingsMismatchError, CliError, RayEngineError) as exc:
        fail(console, str(exc))
    except KeyboardInterrupt:
        out = escape(str(config.out))
        console.print(f"[yellow]interrupted[/]: finished images are saved in {out}; rerun the same command to resume",
                      soft_wrap=True)
        raise typer.Exit(code=130) from None
    _print_summary(result.summary, list(config.methods), list(config.metrics))
    if result.bad_images:
        listed = escape(str(result.files["bad_images"]))
        console.print(f"[yellow]{len(result.bad_images)} image(s) skipped[/] (listed in {listed})", soft_wrap=True)
    typer.echo(f"{result.n_images} images; tables: {result.files['summary_md']}, {result.files['per_image']}; "
               f"report: {result.files['report']}")


def _engine_choice(*options: Any) -> EngineChoice:
    try:
        return ray_options(*options)
    except CliError as exc:
        fail(console, str(exc))


def _engine(choice: EngineChoice) -> dict[str, Engine]:
    """``run_evaluation``'s engine argument: none for the embedded default."""
    if choice.ray is None:
        return {}
    from convlens.runners.ray_engine import RayEvaluateEngine

    return {"engine": RayEvaluateEngine(choice.ray)}


def _registered(method: str) -> bool:
    from convlens.methods.registry import METHODS

    return method in METHODS


def _has_masks_format(data: str, data_format: str) -> bool:
    if data_format in ("voc", "xml", "coco", "synthetic"):
        return True
    if data_format != "auto":
        return False
    path = Path(data)
    from convlens.data.voc import find_voc2007

    return path.suffix.lower() == ".json" or (path.is_dir() and find_voc2007(path) is not None)


def _print_summary(summary: list[dict[str, Any]], methods: list[str], metrics: list[str]) -> None:
    """Metrics as rows, methods as columns: ``mean [95 % CI]`` (all digits are in summary.csv)."""
    index = {(s["method"], s["metric"]): s for s in summary}
    arrows = {"higher": "↑", "lower": "↓"}
    table = Table("metric", *(escape(m) for m in methods), title="mean [95 % bootstrap CI]")
    for column in table.columns:
        column.overflow = "fold"
    for metric in [*metrics, "seconds"]:
        cells = []
        for method in methods:
            s = index[(method, metric)]
            mean, low, high = s["mean"], s["ci_low"], s["ci_high"]
            if not math.isfinite(mean):
                cells.append("—")
            elif math.isfinite(low):
                cells.append(f"{mean:.3g} [{low:.3g}, {high:.3g}]")
            else:
                cells.append(f"{mean:.3g}")
        table.add_row(escape(f"{metric} {arrows[index[(methods[0], metric)]['direction']]}"), *map(escape, cells))
    Console().print(table)

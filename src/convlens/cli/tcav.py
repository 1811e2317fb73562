"""``convlens tcav LABELS_DIR --out DIR``: are the crowd's concepts concepts the model uses? (Kim et al. 2018)

Reads a labels folder (``convlens labels``), builds concept sets from the study's own revealed regions
(:mod:`convlens.concepts.study_concepts`: masked images at the level where players guessed; random sets
from the class's labelled regions, or the whole study's with ``--random-pool study``) and runs
:class:`~convlens.concepts.tcav.TCAVRunner` on every (class, concept, layer): N random sets, the
random-vs-random null, a two-sided Crawford-Howell t-test, Holm over all tests of a class, effect sizes.
Layer attribution: the plain gradient of the class logit w.r.t. the layer output (Kim et al. Eq. 1;
Captum TCAV's default). Writes into DIR:

* ``tcav.csv`` — one row per test, plus one row per skipped concept (``verdict`` "skipped: <reason>");
* ``tcav.json`` — settings, the model and its check against the INV runs, the construction, the regions
  behind every concept, skipped concepts, counts, timings;
* ``cavs/`` — the CAV cache (keys hash the concept images, the model weights, the layer, the classifier).

and copies ``tcav.csv`` into LABELS_DIR, where ``convlens global`` reads it (``--no-place``: it does not;
then pass ``--tcav DIR/tcav.csv`` to ``convlens global``). A different ``tcav.csv`` already there is kept
as ``tcav.previous.csv``. Model: the one the INV runs record (``--model`` / ``--weights`` when they
record none, or to override); it must reproduce every INV run's recorded score of its image, or nothing
runs. Exit codes: 0 done; 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from convlens.cli.common import CliError, fail

__all__ = ["TcavSettings", "run_tcav", "tcav_command"]

console = Console(stderr=True)
FORMAT = "convlens-tcav"
LAYER_ATTRIBUTION = ("plain gradient of the class logit w.r.t. the layer output (Captum LayerGradientXActivation "
                     "with multiply_by_inputs=False, Captum TCAV's default): the directional derivative of Kim et al. "
                     "Eq. 1; gradient x activation would weight units by their activation and test another quantity")
TEST = ("concept's mean statistic over N runs against N random sets vs the random sets' own means (each against "
        "the others): two-sided Crawford-Howell t-test, N-1 df; Holm over all tests of a class; effect size "
        "z = (T_C - mean T_R) / SD T_R")


@dataclass
class TcavSettings:
    """The command's options, checked."""

    labels_dir: Path
    out: Path
    layers: list[str] | None = None
    random_runs: int = 20
    alpha: float = 0.05
    statistic: str = "magnitude"
    sizes: tuple[int, ...] = (10, 20, 40)
    classes: list[str] | None = None
    model: str | None = None
    weights: str | None = None
    inv_root: Path | None = None
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 64
    place: bool = True
    random_pool: str = "class"


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def _check(settings: TcavSettings) -> None:
    from convlens.concepts.tcav import STATISTICS

    if not settings.labels_dir.is_dir():
        raise CliError(f"{settings.labels_dir}: no such folder (expected the output folder of `convlens labels`)")
    if settings.out.exists() and not settings.out.is_dir():
        raise CliError(f"--out {settings.out}: exists and is not a folder")
    if settings.random_runs < 3:
        raise CliError(f"--random-runs must be >= 3 (the null needs 3 random sets or more), got {settings.random_runs}")
    if not 0 < settings.alpha < 1:
        raise CliError(f"--alpha must be in (0, 1), got {settings.alpha}")
    if settings.statistic not in STATISTICS:
        raise CliError(f"--statistic must be one of {', '.join(STATISTICS)}, got {settings.statistic!r}")
    if not settings.sizes or min(settings.sizes) < 2:
        raise CliError(f"--sizes: concept sizes must be integers >= 2, got {list(settings.sizes)}")
    if settings.random_pool not in ("class", "study"):
        raise CliError(f"--random-pool must be class or study, got {settings.random_pool!r}")
    if settings.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.device not in ("cpu", "cuda") and not settings.device.startswith("cuda:"):
        raise CliError(f"--device {settings.device!r}: convlens runs on cpu or cuda")


def _load_model(name: str, weights: str | None, device: str) -> Any:
    import torch

    from convlens.models import available_models, load
    from convlens.models.synthetic import SYNTHETIC_MODELS, load_synthetic_model

    if device != "cpu" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device is available on this machine")
    try:
        if name not in available_models() and name in SYNTHETIC_MODELS:
            loaded = load_synthetic_model(name, weights)
        else:
            loaded = load(name, weights=weights)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"model {name!r}: {exc}") from exc
    return loaded.to(device) if device != "cpu" else loaded


def _model_name(settings: TcavSettings, recorded: list[str]) -> str:
    if settings.model:
        return settings.model
    if len(recorded) == 1:
        return recorded[0]
    if not recorded:
        raise CliError("the INV runs do not record which model they explained: pass --model (and --weights)")
    raise CliError(f"the INV runs record several models {recorded}: pass --model (and --weights)")


def _verify(model: Any, images: Any, to_input: Any, name: str, weights: str | None) -> dict[str, Any]:
    from convlens.concepts.study_concepts import check_model

    checks = check_model(model.module, images, to_input)
    wrong = [c for c in checks if not c.matches]
    if wrong:
        c = wrong[0]
        raise CliError(f"model {name!r} ({weights or 'default weights'}) does not reproduce the INV runs: image "
                       f"{c.image_id} scores {c.computed:.6g}, the run recorded {c.recorded:.6g} ({len(wrong)} of "
                       f"{len(checks)} images differ); pass the --model and --weights the runs were made with")
    diffs = [abs(c.computed - c.recorded) for c in checks]
    return {"images": len(checks), "max_abs_difference": max(diffs, default=0.0), "all_match": True}


def _layers(settings: TcavSettings, model: Any, concepts: Any) -> list[str]:
    from convlens.core.layers import resolve_layers

    if settings.layers is None:
        per_image = [[layer.name for layer in i.explanation.layers] for i in concepts.images.values()]
        common = [name for name in per_image[0] if all(name in names for names in per_image)]
        if not common:
            raise CliError("the INV runs share no explained layer: pass --layers")
        spec: Any = common
    else:
        spec = settings.layers[0] if settings.layers in (["blocks"], ["last"]) else settings.layers
    shape = tuple(next(iter(concepts.class_inputs.values())).shape[1:])
    try:
        return resolve_layers(model.module, spec, shape)
    except ValueError as exc:
        raise CliError(f"--layers: {exc}") from exc


def _prepare(settings: TcavSettings) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """Everything that can fail on bad input, before anything is written."""
    from convlens.concepts.label_files import read_labels
    from convlens.concepts.study_concepts import (
        build_study_concepts,
        chosen_classes,
        find_study_images,
        model_input,
        needed_images,
        recorded_models,
    )
    from convlens.study.reveal import REVEAL_PERCENTAGES, reveal_image

    _check(settings)
    folder = read_labels(settings.labels_dir)
    classes = chosen_classes(folder, settings.classes, settings.random_pool)
    pooled = classes if settings.random_pool == "class" else chosen_classes(folder, None, "study")
    images = find_study_images(folder, needed_images(folder, pooled), settings.inv_root)
    recorded = recorded_models(images)  # before the concepts: the model's input construction needs the name
    name = _model_name(settings, recorded)
    model = _load_model(name, settings.weights, settings.device)
    to_input = model_input(model.preprocessing)
    concepts = build_study_concepts(folder, to_input, reveal_image, percentages=REVEAL_PERCENTAGES,
                                    sizes=settings.sizes, random_runs=settings.random_runs, seed=settings.seed,
                                    classes=settings.classes,
                                    inv_root=settings.inv_root, images=images, random_pool=settings.random_pool)
    check = _verify(model, concepts.images, to_input, name, settings.weights)
    layers = _layers(settings, model, concepts)
    info = {"name": name, "source": model.source, "weights": settings.weights, "recorded_by_inv_runs": recorded,
            "check": check}
    return model, concepts, layers, info


def _csv_text(report: Any, concepts: Any) -> str:
    """The report's rows, then one row per skipped concept (empty statistics, ``verdict`` says why)."""
    rows = report.rows()
    columns = list(rows[0]) if rows else ["model", "class_id", "class", "concept", "layer", "significant", "verdict"]
    for skipped in concepts.skipped:
        rows.append({"model": report.model, "class_id": concepts.class_ids.get(skipped.class_name, ""),
                     "class": skipped.class_name, "concept": skipped.label, "layer": "", "significant": "",
                     "n_concept_images": skipped.regions, "verdict": f"skipped: {skipped.reason}"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _manifest(settings: TcavSettings, report: Any, concepts: Any, layers: list[str], model: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    from convlens.concepts.manifest import package_versions

    tests = len(report.tests)
    return {
        "format": FORMAT, "format_version": 1, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": str(settings.labels_dir.resolve()), "model": model, "layers": layers,
        "layer_attribution": LAYER_ATTRIBUTION, "test": TEST, "random_runs": settings.random_runs,
        "alpha": settings.alpha, "statistic": settings.statistic, "seed": settings.seed,
        "random_pool": settings.random_pool,
        "concepts": concepts.describe(), "counts": {**report.counts, "tests": tests,
                                                    "significant": sum(t.significant for t in report.tests),
                                                    "skipped": len(concepts.skipped)},
        "timings": {**report.timings, "total": seconds, "per_test": seconds / tests if tests else None},
        "versions": package_versions(("convlens", "torch", "captum", "scikit-learn", "scipy", "numpy")),
    }


def _place(csv_path: Path, labels_dir: Path) -> str:
    """Copy ``tcav.csv`` into the labels folder (a different one there becomes ``tcav.previous.csv``)."""
    from convlens.core.files import atomic_write_text

    target = labels_dir / "tcav.csv"
    text = csv_path.read_text(encoding="utf-8")
    try:
        if target.is_file() and target.read_text(encoding="utf-8") != text:
            target.replace(labels_dir / "tcav.previous.csv")
        atomic_write_text(target, text)
    except OSError as exc:
        return f"could not copy tcav.csv into {labels_dir} ({exc.strerror or exc}): pass --tcav {csv_path} to " \
               "convlens global"
    return f"placed {target} (convlens global {labels_dir} shows the verdicts)"


def run_tcav(settings: TcavSettings) -> tuple[Any, Any, Path]:
    """Check, build, test and write (see the module docstring); CliError / ValueError for bad input."""
    import time

    from convlens.concepts.tcav import TCAVRunner
    from convlens.core.files import atomic_write_text

    model, concepts, layers, info = _prepare(settings)
    runner = TCAVRunner(model.module, layers, model_name=info["name"], class_names=concepts.class_names,
                        random_runs=settings.random_runs, alpha=settings.alpha, statistic=settings.statistic,
                        cache_dir=settings.out / "cavs", batch_size=settings.batch_size, seed=settings.seed)
    settings.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = runner.run(concepts.class_inputs, concepts.concepts, concepts.random_sets)
    seconds = time.perf_counter() - start
    atomic_write_text(settings.out / "tcav.csv", _csv_text(report, concepts))
    manifest = _manifest(settings, report, concepts, layers, info, seconds)
    atomic_write_text(settings.out / "tcav.json", json.dumps(manifest, indent=2, default=str))
    return report, concepts, settings.out / "tcav.csv"


def _summary(report: Any, concepts: Any, csv_path: Path, placed: str | None) -> None:
    significant = [t for t in report.tests if t.significant]
    typer.echo(f"{len(report.tests)} tests ({len({(t.class_name, t.concept) for t in report.tests})} concepts x "
               f"{len({t.layer for t in report.tests})} layers), {len(significant)} significant after Holm")
    for t in significant:
        typer.echo(f"  {t.class_name} / {t.concept} @ {t.layer}: {t.verdict}, p = {t.p_holm:.3g}, "
                   f"z = {t.comparison.effect_size:+.3g}")
    for s in concepts.skipped:
        typer.echo(f"  skipped {s.class_name} / {s.label or '(class)'}: {s.reason}")
    typer.echo(f"wrote {csv_path} and {csv_path.with_name('tcav.json')}")
    if placed:
        typer.echo(placed)


def tcav_command(
    labels_dir: Annotated[Path, typer.Argument(help="Output folder of `convlens labels`.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder (tcav.csv, tcav.json, CAV cache).")] = Path("out/tcav"),
    layers: Annotated[str | None, typer.Option(
        help="Comma-separated module names, blocks or last (default: the INV runs' layers).")] = None,
    random_runs: Annotated[int, typer.Option(help="Random sets per concept (N; warning below 10).")] = 20,
    alpha: Annotated[float, typer.Option(help="Family-wise level per class (Holm).")] = 0.05,
    statistic: Annotated[str, typer.Option(help="magnitude | sign_count: the statistic that decides.")] = "magnitude",
    sizes: Annotated[str, typer.Option(help="Common concept sizes (comma-separated).")] = "10,20,40",
    classes: Annotated[str | None, typer.Option(help="Comma-separated classes to test (default: all).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default: the one the INV runs record).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local state_dict the INV runs were made with.")] = None,
    inv_root: Annotated[Path | None, typer.Option(help="Folder holding the INV runs, if they moved.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of concept sampling, random sets and CAV training.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward/backward pass.")] = 64,
    place: Annotated[bool, typer.Option("--place/--no-place", help="Copy tcav.csv into LABELS_DIR.")] = True,
    random_pool: Annotated[str, typer.Option(
        help="class: random regions of the concept's class (what the label adds) | study: of every class.")] = "class",
) -> None:
    """TCAV: is each crowd concept of a class used by the model for that class? (per layer, Holm, effect sizes)"""
    try:
        size_list = tuple(int(v) for v in _split(sizes) or [])
    except ValueError:
        fail(console, f"--sizes {sizes!r}: expected comma-separated integers")
    settings = TcavSettings(labels_dir, out, _split(layers), random_runs, alpha, statistic, size_list,
                            _split(classes), model, weights, inv_root, device, seed, batch_size, place, random_pool)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            report, concepts, csv_path = run_tcav(settings)
    except (CliError, ValueError) as exc:
        fail(console, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except OSError as exc:
        fail(console, f"cannot write the results: {exc.strerror or exc}")
    for warning in caught:
        if "random runs" in str(warning.message):
            console.print(f"warning: {warning.message}", markup=False)
    _summary(report, concepts, csv_path, _place(csv_path, labels_dir) if place else None)

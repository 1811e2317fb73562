"""TCAV on a Deep Reveal study: are the crowd's concepts concepts the model uses? (Kim et al. 2018)

:func:`run_study_tcav` reads a labels folder (``convlens labels``), builds concept sets from the study's
own revealed regions (:mod:`convlens.tcav.study_concepts`), checks that the model reproduces the INV runs,
runs :class:`~convlens.tcav.runner.TCAVRunner` on every (class, concept, layer) and writes ``tcav.csv``
(one row per test, and per skipped concept), ``tcav.json`` (settings, model check, construction, counts,
timings) and the CAV cache ``cavs/`` into ``out``; with ``place`` it copies ``tcav.csv`` into the labels
folder, where ``convlens global`` reads it. Bad input raises :class:`TcavInputError` before anything is
written. ``convlens tcav`` is this function's command line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convlens.core.devices import DeviceError, check_device
from convlens.tcav.runner import STATISTICS

__all__ = ["StudyTcavResult", "TcavInputError", "TcavSettings", "run_study_tcav", "run_tcav"]

FORMAT = "convlens-tcav"
LAYER_ATTRIBUTION = ("plain gradient of the class logit w.r.t. the layer output (Captum LayerGradientXActivation "
                     "with multiply_by_inputs=False, Captum TCAV's default): the directional derivative of Kim et al. "
                     "Eq. 1; gradient x activation would weight units by their activation and test another quantity")
TEST = ("concept's mean statistic over N runs against N random sets vs the random sets' own means (each against "
        "the others): two-sided Crawford-Howell t-test, N-1 df; Holm over all tests of a class; effect size "
        "z = (T_C - mean T_R) / SD T_R")


class TcavInputError(ValueError):
    """Bad input to a study's TCAV run (one line; nothing was written)."""


@dataclass(kw_only=True)
class TcavSettings:
    """What :func:`run_study_tcav` tests and how (the options of ``convlens tcav``)."""

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

    def __post_init__(self) -> None:
        self.labels_dir, self.out = Path(self.labels_dir), Path(self.out)
        self.inv_root = Path(self.inv_root) if self.inv_root is not None else None


@dataclass(kw_only=True)
class StudyTcavResult:
    """The report, the concepts behind it, where ``tcav.csv`` went and what placing it said."""

    report: Any
    concepts: Any
    csv_path: Path
    placed: str | None


def run_study_tcav(labels_dir: str | Path, out: str | Path = "out/tcav", **options: Any) -> StudyTcavResult:
    """TCAV on every concept of a labels folder; ``options`` are :class:`TcavSettings` fields."""
    return run_tcav(TcavSettings(labels_dir=Path(labels_dir), out=Path(out), **options))


def _check(labels_dir: Path, out: Path, settings: TcavSettings) -> None:
    if not labels_dir.is_dir():
        raise TcavInputError(f"{labels_dir}: no such folder (expected the output folder of `convlens labels`)")
    if out.exists() and not out.is_dir():
        raise TcavInputError(f"--out {out}: exists and is not a folder")
    if settings.random_runs < 3:
        raise TcavInputError(f"--random-runs must be >= 3 (the null needs 3 random sets or more), "
                             f"got {settings.random_runs}")
    if not 0 < settings.alpha < 1:
        raise TcavInputError(f"--alpha must be in (0, 1), got {settings.alpha}")
    if settings.statistic not in STATISTICS:
        raise TcavInputError(f"--statistic must be one of {', '.join(STATISTICS)}, got {settings.statistic!r}")
    if not settings.sizes or min(settings.sizes) < 2:
        raise TcavInputError(f"--sizes: concept sizes must be integers >= 2, got {list(settings.sizes)}")
    if settings.random_pool not in ("class", "study"):
        raise TcavInputError(f"--random-pool must be class or study, got {settings.random_pool!r}")
    if settings.batch_size < 1:
        raise TcavInputError(f"--batch-size must be >= 1, got {settings.batch_size}")
    try:
        check_device(settings.device)
    except DeviceError as exc:
        raise TcavInputError(str(exc)) from None


def _load_model(name: str, weights: str | None, device: str) -> Any:
    from convlens.models import available_models, load
    from convlens.models.synthetic import SYNTHETIC_MODELS, load_synthetic_model

    try:
        if name not in available_models() and name in SYNTHETIC_MODELS:
            loaded = load_synthetic_model(name, weights)
        else:
            loaded = load(name, weights=weights)
    except (ValueError, FileNotFoundError) as exc:
        raise TcavInputError(f"model {name!r}: {exc}") from exc
    return loaded.to(device) if device != "cpu" else loaded


def _model_name(settings: TcavSettings, recorded: list[str]) -> str:
    if settings.model:
        return settings.model
    if len(recorded) == 1:
        return recorded[0]
    if not recorded:
        raise TcavInputError("the INV runs do not record which model they explained: pass --model (and --weights)")
    raise TcavInputError(f"the INV runs record several models {recorded}: pass --model (and --weights)")


def _verify(model: Any, images: Any, to_input: Any, name: str, weights: str | None) -> dict[str, Any]:
    from convlens.tcav.study_concepts import check_model

    checks = check_model(model.module, images, to_input)
    wrong = [c for c in checks if not c.matches]
    if wrong:
        c = wrong[0]
        raise TcavInputError(f"model {name!r} ({weights or 'default weights'}) does not reproduce the INV runs: image "
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
            raise TcavInputError("the INV runs share no explained layer: pass --layers")
        spec: Any = common
    else:
        spec = settings.layers[0] if settings.layers in (["blocks"], ["last"]) else settings.layers
    shape = tuple(next(iter(concepts.class_inputs.values())).shape[1:])
    try:
        return resolve_layers(model.module, spec, shape)
    except ValueError as exc:
        raise TcavInputError(f"--layers: {exc}") from exc


def _prepare(settings: TcavSettings) -> tuple[Any, Any, list[str], dict[str, Any]]:
    """Everything that can fail on bad input, before anything is written."""
    from convlens.inv.reveal import REVEAL_PERCENTAGES, reveal_image
    from convlens.labels.files import read_labels
    from convlens.tcav.study_concepts import (
        build_study_concepts,
        chosen_classes,
        find_study_images,
        model_input,
        needed_images,
        recorded_models,
    )

    _check(settings.labels_dir, settings.out, settings)
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
    from convlens.core.provenance import package_versions

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


def run_tcav(settings: TcavSettings) -> StudyTcavResult:
    """Check, build, test and write (see the module docstring); ValueError (TcavInputError) for bad input."""
    import time

    from convlens.core.files import atomic_write_text
    from convlens.tcav.runner import TCAVRunner

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
    placed = _place(settings.out / "tcav.csv", settings.labels_dir) if settings.place else None
    return StudyTcavResult(report=report, concepts=concepts, csv_path=settings.out / "tcav.csv", placed=placed)



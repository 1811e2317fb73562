"""TCAV on a Deep Reveal study: are the crowd's concepts concepts the model uses? (Kim et al. 2018)

:func:`run_study_tcav` reads a labels folder (``convlens labels``), builds concept sets from the study's
own revealed regions (:mod:`convlens.tcav.study_concepts`), checks that the model reproduces the INV runs,
runs :class:`~convlens.tcav.runner.TCAVRunner` on every (class, concept, layer) and writes its output
folder whole (:mod:`convlens.core.outputs`: built aside, sealed, renamed into place): ``tcav.csv`` (one row
per test, and per skipped concept), ``tcav.json`` (settings, model check, construction, counts, timings,
every file's size and SHA-256) and the CAV cache ``cavs/``. With ``place`` it copies ``tcav.csv`` into the
labels folder, where ``convlens global`` reads it — replacing a ``tcav.csv`` there only if convlens put it
there (its SHA-256 is in ``tcav.placed.json``). Bad input raises :class:`TcavInputError` before anything
is written. ``convlens tcav`` is this function's command line.

The CAV cache is part of the folder but not of its seal (``seal(exclude=["cavs"])``): it is a cache, not
a result — each entry is checked when it is loaded (a bad one is trained again, with a warning), it may be
deleted at any time, and hashing thousands of CAV files on every read would cost more than the results
it guards. It lives inside the folder so that it goes with the results it made; a rerun carries it into
the new folder by hard links (copies where links are impossible), so the previous folder keeps its own
until the new one replaces it and a killed run loses neither.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convlens.core.devices import DeviceError, check_device
from convlens.core.outputs import FolderKind, OutputFolderError, check_output_folder

__all__ = ["TCAV_FOLDER", "StudyTcavResult", "TcavInputError", "TcavSettings", "run_study_tcav", "run_tcav"]

FORMAT = "convlens-tcav"
FORMAT_VERSION = 2  # 2: sealed folder (files and their SHA-256), verdict wording, CAV accuracies, layer roles
TCAV_FOLDER = FolderKind(command="convlens tcav", manifest="tcav.json", format=FORMAT,
                         names=frozenset({"tcav.json", "tcav.csv", "cavs"}))
CACHE = "cavs"
PLACED = "tcav.placed.json"  # in a labels folder: the SHA-256 of every tcav.csv convlens placed there
PLACED_FORMAT = "convlens-tcav-placed"
STATISTIC_DEFINITIONS = {
    "magnitude": "mean over the class's images of the directional derivative of the class logit along the unit CAV "
                 "(how much moving the layer's activations towards the concept raises the class score)",
    "sign_count": "Kim et al.'s TCAV score: the share of the class's images whose class logit rises along the CAV",
}
CAV_CLASSIFIER = ("linear SVM with the squared hinge loss (L2-SVM), penalty alpha 0.01, unpenalised intercept, "
                  "solved exactly (finite Newton, batched, deterministic); held-out accuracy by 3-fold "
                  "cross-validation")
READING = ("used (+) / used (-): significant after Holm over the class's tests, moving towards the concept raises / "
           "lowers the class score more than random directions do; 'no evidence at this power' is not 'not used': "
           "the test misses effects smaller than detectable_effect_size null SDs; 'cannot test': the null has no "
           "spread or is not finite; verdicts at earlier layers (layer_role 'earlier') have no known answer; "
           "cav_at_chance: the layer does not tell the concept's images from random ones, so its CAVs are arbitrary")
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
    random_pool: str = "study"

    def __post_init__(self) -> None:
        self.labels_dir, self.out = Path(self.labels_dir), Path(self.out)
        self.inv_root = Path(self.inv_root) if self.inv_root is not None else None


@dataclass(kw_only=True)
class StudyTcavResult:
    """The report, the concepts behind it, where ``tcav.csv`` went and what placing it said (``placed``:
    ``None`` without placing; ``place_refused``: the labels folder's ``tcav.csv`` is not convlens's, or
    could not be written, and was left as it was)."""

    report: Any
    concepts: Any
    csv_path: Path
    placed: str | None
    place_refused: bool = False


def run_study_tcav(labels_dir: str | Path, out: str | Path = "out/tcav", **options: Any) -> StudyTcavResult:
    """TCAV on every concept of a labels folder; ``options`` are :class:`TcavSettings` fields."""
    return run_tcav(TcavSettings(labels_dir=Path(labels_dir), out=Path(out), **options))


def _check(labels_dir: Path, out: Path, settings: TcavSettings) -> None:
    from convlens.tcav.stats import STATISTICS
    from convlens.tcav.study_concepts import RANDOM_POOLS

    if not labels_dir.is_dir():
        raise TcavInputError(f"{labels_dir}: no such folder (expected the output folder of `convlens labels`)")
    try:
        check_output_folder(out, TCAV_FOLDER)
    except OutputFolderError as exc:
        raise TcavInputError(str(exc)) from None
    if settings.random_runs < 3:
        raise TcavInputError(f"--random-runs must be >= 3 (the null needs 3 random sets or more), "
                             f"got {settings.random_runs}")
    if not 0 < settings.alpha < 1:
        raise TcavInputError(f"--alpha must be in (0, 1), got {settings.alpha}")
    if settings.statistic not in STATISTICS:
        raise TcavInputError(f"--statistic must be one of {', '.join(STATISTICS)}, got {settings.statistic!r}")
    if not settings.sizes or min(settings.sizes) < 2:
        raise TcavInputError(f"--sizes: concept sizes must be integers >= 2, got {list(settings.sizes)}")
    if settings.random_pool not in RANDOM_POOLS:
        raise TcavInputError(f"--random-pool must be one of {', '.join(RANDOM_POOLS)}, got {settings.random_pool!r}")
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
    pooled = classes if settings.random_pool != "study" else chosen_classes(folder, None, "study")
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
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": str(settings.labels_dir.resolve()), "model": model, "layers": layers,
        "layer_attribution": LAYER_ATTRIBUTION, "test": TEST, "random_runs": settings.random_runs,
        "alpha": settings.alpha, "statistic": settings.statistic, "statistic_definition": STATISTIC_DEFINITIONS,
        "cav_classifier": CAV_CLASSIFIER, "reading": READING, "seed": settings.seed,
        "random_pool": settings.random_pool,
        "concepts": concepts.describe(), "counts": {**report.counts, "tests": tests,
                                                    "significant": sum(t.significant for t in report.tests),
                                                    "skipped": len(concepts.skipped)},
        "timings": {**report.timings, "total": seconds, "per_test": seconds / tests if tests else None},
        "versions": package_versions(("convlens", "torch", "captum", "scikit-learn", "scipy", "numpy")),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _placed_record(path: Path) -> list[dict[str, Any]]:
    """The placements ``tcav.placed.json`` records (none when it is missing or unreadable)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(record, dict) or record.get("format") != PLACED_FORMAT or not isinstance(record.get("placed"),
                                                                                              list):
        return []
    return [entry for entry in record["placed"] if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)]


def _place(csv_path: Path, labels_dir: Path) -> tuple[str, bool]:
    """Copy ``tcav.csv`` into the labels folder; (what happened, whether it was refused).

    A ``tcav.csv`` (or ``tcav.previous.csv``) already there is replaced only if ``tcav.placed.json``
    records its SHA-256, i.e. convlens put it there; otherwise nothing changes. The record is written
    first, so that every file convlens leaves there, even after a kill, is in it; a different earlier
    ``tcav.csv`` of convlens's becomes ``tcav.previous.csv``."""
    from convlens.core.files import atomic_write_bytes, atomic_write_text

    target, previous, record_path = labels_dir / "tcav.csv", labels_dir / "tcav.previous.csv", labels_dir / PLACED
    advice = f"the results are in {csv_path} (convlens global {labels_dir} --tcav {csv_path})"
    data = csv_path.read_bytes()
    placed = _placed_record(record_path)
    ours = {entry["sha256"] for entry in placed}
    try:
        current = target.read_bytes() if target.is_file() else None
        if (target.exists() or target.is_symlink()) and (current is None or target.is_symlink()):
            return f"not placed: {target} is not a file convlens wrote; {advice}", True
        if current is not None and _sha256(current) == _sha256(data):
            return f"placed {target} (unchanged; convlens global {labels_dir} shows the verdicts)", False
        if current is not None and _sha256(current) not in ours:
            return f"not placed: {target} was not placed by convlens tcav (no matching SHA-256 in {PLACED}); " \
                   f"{advice}", True
        if current is not None and previous.exists() and (
                not previous.is_file() or _sha256(previous.read_bytes()) not in ours):
            return f"not placed: {previous} was not placed by convlens tcav; {advice}", True
        entry = {"sha256": _sha256(data), "source": str(csv_path.resolve()),
                 "placed": datetime.now(UTC).isoformat(timespec="seconds")}
        record = {"format": PLACED_FORMAT, "placed": [*placed[-19:], entry]}
        atomic_write_text(record_path, json.dumps(record, indent=2))
        if current is not None:
            target.replace(previous)
        atomic_write_bytes(target, data)
    except OSError as exc:
        return f"not placed: cannot write into {labels_dir} ({exc.strerror or exc}); {advice}", True
    return f"placed {target} (convlens global {labels_dir} shows the verdicts)", False


def _carry_cache(previous: Path, new: Path) -> None:
    """The previous run's CAV files into the new folder: hard links (copies where linking fails), leaving
    out what a killed writer left (temporary names)."""
    import os
    import shutil

    from convlens.core.files import is_temporary_name

    if not previous.is_dir() or previous.is_symlink():
        return
    for folder, _, files in os.walk(previous):
        target = new / Path(folder).relative_to(previous)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if is_temporary_name(name) or Path(folder, name).is_symlink():
                continue
            try:
                os.link(Path(folder, name), target / name)
            except OSError:
                shutil.copy2(Path(folder, name), target / name)


def run_tcav(settings: TcavSettings) -> StudyTcavResult:
    """Check, build, test and write (see the module docstring); ValueError (TcavInputError) for bad input."""
    import time

    from convlens.core.outputs import OutputFolder
    from convlens.tcav.runner import TCAVRunner

    model, concepts, layers, info = _prepare(settings)
    runner = TCAVRunner(model.module, layers, model_name=info["name"], class_names=concepts.class_names,
                        random_runs=settings.random_runs, alpha=settings.alpha, statistic=settings.statistic,
                        batch_size=settings.batch_size, seed=settings.seed, device=settings.device)
    try:
        folder = OutputFolder(settings.out, TCAV_FOLDER)
    except OutputFolderError as exc:
        raise TcavInputError(str(exc)) from None
    with folder:
        _carry_cache(settings.out / CACHE, folder.path / CACHE)
        runner.cache_dir = folder.path / CACHE
        start = time.perf_counter()
        report = runner.run(concepts.class_inputs, concepts.concepts, concepts.random_sets)
        seconds = time.perf_counter() - start
        (folder.path / "tcav.csv").write_text(_csv_text(report, concepts), encoding="utf-8")
        folder.seal(_manifest(settings, report, concepts, layers, info, seconds), exclude=[CACHE])
    csv_path = settings.out / "tcav.csv"
    placed, refused = _place(csv_path, settings.labels_dir) if settings.place else (None, False)
    return StudyTcavResult(report=report, concepts=concepts, csv_path=csv_path, placed=placed, place_refused=refused)

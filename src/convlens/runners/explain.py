"""``convlens explain`` as a library: explain images or folders into an output folder with a report.

:func:`prepare_explain` checks everything the user gave (methods and their parameters, target, layers,
device, model and weights, explicitly named files, the output folder) and loads the model — nothing is
written, and any problem is one :class:`ExplainError`. :func:`execute_explain` then writes, image by
image (:func:`~convlens.runners.explain_image.explain_image`), through the output folder's store
(:mod:`convlens.runners.explain_store`: naming, resume, atomic folders, clean-up, lock), and finally
``index.html`` and ``results.json``. :func:`run_explain` does both. Where the images are explained is an
*engine* (:data:`ExplainEngine`): this process by default (:func:`embedded_explain_engine`), or Ray workers
(:mod:`convlens.runners.ray_engine`); the store, the resume and the report are the same either way.

In a folder, images are the files with an image suffix (``.jpg``, ``.png``, ...; unreadable ones are
listed and skipped); hidden files and folders, the output folder and any folder a ``convlens explain``
run wrote are never read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

import convlens
from convlens.core.devices import DeviceError, check_device
from convlens.core.engine import report_progress
from convlens.core.params import ParamError
from convlens.core.targets import class_id_from_name
from convlens.models import LoadedModel, load
from convlens.models.images import IMAGE_SUFFIXES, ImageLoadError, load_image
from convlens.reports.html import render_explain_report
from convlens.runners.evaluate_setup import weights_digest
from convlens.runners.explain_image import ImageSettings, explain_image, file_digest
from convlens.runners.explain_methods import build_explainers, get_explainer_spec, parse_method_params
from convlens.runners.explain_store import (
    PAGE,
    ExplainStore,
    OutputFolderError,
    check_output_folder,
    is_explain_output,
)

__all__ = [
    "ExplainConfig",
    "ExplainEngine",
    "ExplainError",
    "ExplainPlan",
    "ExplainProgress",
    "ExplainResult",
    "ImageJob",
    "collect_inputs",
    "embedded_explain_engine",
    "execute_explain",
    "prepare_explain",
    "run_explain",
]


class ExplainError(ValueError):
    """A user error: one message, nothing written (``convlens explain`` exits with code 2)."""


@dataclass
class ExplainConfig:
    """What ``convlens explain`` was asked to do (command-line text, checked by :func:`prepare_explain`)."""

    inputs: Sequence[str]
    model: str = "efficientnet_lite0"
    weights: str | None = None
    methods: Sequence[str] = ("gradcam",)
    target: str = "predicted"
    layers: str | None = None
    out: Path = Path("out/explain")
    device: str = "cpu"
    batch_size: int = 64
    params: Sequence[str] = ()
    per_block: bool = False
    resume: bool = True
    title: str = "convlens explain"
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


class ExplainProgress(Protocol):
    """What a run reports while it works (the command line draws it; user text must be shown verbatim)."""

    def start(self, images: int) -> None: ...
    def image_done(self) -> None: ...
    def forwards(self, count: int) -> None: ...
    def skipped(self, message: str) -> None: ...
    def waiting(self, out: Path) -> None: ...


class _Silent:
    def start(self, images: int) -> None: ...
    def image_done(self) -> None: ...
    def forwards(self, count: int) -> None: ...
    def skipped(self, message: str) -> None: ...
    def waiting(self, out: Path) -> None: ...


@dataclass
class ExplainPlan:
    """A checked run, ready to execute: the model, explainers and inputs."""

    config: ExplainConfig
    loaded: LoadedModel
    explainers: dict[str, Any]
    target: int | None
    inputs: list[Path]
    config_hash: str


@dataclass
class ExplainResult:
    """What a run wrote: per-image records (each with its ``dir``) and the skipped inputs."""

    out: Path
    records: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    removed_temporaries: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: every image explained; 1: some (or all) images skipped."""
        return 0 if self.records and not self.skipped else 1


# A job fills the fresh folder it is given with one image's files and returns the image's record; it raises
# ImageLoadError for an unusable image. An engine yields ``(position in paths, job)`` for every path it is
# given, in any order (convlens.runners.ray_engine spreads the images over a Ray cluster).
ImageJob = Callable[[Path], dict[str, Any]]
ExplainEngine = Callable[
    [ExplainPlan, ImageSettings, Sequence[Path], ExplainProgress], Iterator[tuple[int, ImageJob]]
]


def run_explain(config: ExplainConfig, progress: ExplainProgress | None = None) -> ExplainResult:
    """Check, then run ``config``. Raises :class:`ExplainError` (nothing written) for bad input."""
    return execute_explain(prepare_explain(config), progress)


def prepare_explain(config: ExplainConfig) -> ExplainPlan:
    """Check every input and load the model; writes nothing. Raises :class:`ExplainError`."""
    methods = _method_names(config.methods)
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ExplainError(f"--batch-size must be an integer >= 1, got {config.batch_size!r}")
    device = _device(config.device)
    weights_sha256 = _weights_digest(config.weights)
    try:
        per_method = parse_method_params(config.params, methods, config.method_overrides)
    except ParamError as exc:
        raise ExplainError(str(exc)) from exc
    inputs = collect_inputs(config.inputs, Path(config.out))
    try:
        check_output_folder(Path(config.out))
    except OutputFolderError as exc:
        raise ExplainError(str(exc)) from exc
    loaded = _load_model(config, device)
    target = _target(config.target, loaded)
    try:
        explainers = build_explainers(loaded, methods, per_method, config.layers, config.batch_size)
    except ValueError as exc:
        raise ExplainError(str(exc)) from exc
    recorded = {name: explainer.params() for name, explainer in explainers.items()}
    settings = [config.model, config.weights, weights_sha256, methods, target, config.layers, per_method, recorded]
    key = json.dumps(settings, sort_keys=True, default=str)
    return ExplainPlan(config, loaded, explainers, target, inputs, hashlib.sha256(key.encode()).hexdigest()[:16])


def _method_names(requested: Sequence[str]) -> list[str]:
    names: list[str] = []
    for raw in requested:
        if not raw.strip():
            continue
        try:
            name = get_explainer_spec(raw).name
        except ValueError as exc:
            raise ExplainError(str(exc)) from exc
        if name not in names:
            names.append(name)
    if not names:
        raise ExplainError("--methods: give at least one method")
    return names


def _device(text: str) -> torch.device:
    try:
        return check_device(text)
    except DeviceError as exc:
        raise ExplainError(str(exc)) from None


def _weights_digest(weights: str | None) -> str | None:
    """SHA-256 of the ``--weights`` file, part of the fingerprint: new weights at the same path are recomputed."""
    try:
        return weights_digest(weights)
    except DeviceError as exc:
        raise ExplainError(str(exc)) from None


def _load_model(config: ExplainConfig, device: torch.device) -> LoadedModel:
    try:
        loaded = load(config.model, weights=config.weights)
    except (ValueError, FileNotFoundError) as exc:
        raise ExplainError(str(exc)) from exc
    return loaded.to(device) if device.type != "cpu" else loaded


def _target(text: str | None, loaded: LoadedModel) -> int | None:
    """None for the predicted class (``predicted``; the old spelling ``auto``), else the class id."""
    if text in ("predicted", "auto", "", None):
        return None
    try:
        target = class_id_from_name(text, loaded.class_names)
    except ValueError as exc:
        raise ExplainError(str(exc)) from exc
    n = loaded.num_classes
    if not 0 <= target < n:
        raise ExplainError(f"--target {text}: out of range, {loaded.name} has {n} classes (0..{n - 1})")
    return target


def collect_inputs(inputs: Sequence[str], out: Path) -> list[Path]:
    """The images to explain, in order, each once: files named explicitly (they must load), then the image
    files found in folders (never in hidden folders, ``out`` or another explain run's folders)."""
    explicit: list[Path] = []
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found.extend(_scan(path, out))
        elif path.is_file():
            explicit.append(path)
        else:
            raise ExplainError(f"{raw}: no such file or directory")
    for path in explicit:  # explicitly named files must all be usable: fail before writing anything
        try:
            load_image(path)
        except ImageLoadError as exc:
            raise ExplainError(str(exc)) from exc
    unique = {str(p.resolve()): p for p in reversed([*explicit, *found])}
    ordered = [p for p in [*explicit, *found] if unique.get(str(p.resolve())) is p]
    if not ordered:
        suffixes = " ".join(IMAGE_SUFFIXES)
        raise ExplainError(f"no input images found (folders are searched for {suffixes}; {out} is never read)")
    return ordered


def _scan(root: Path, out: Path) -> list[Path]:
    out_resolved = out.resolve()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        if here.resolve() == out_resolved or is_explain_output(here):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(here / f for f in sorted(files) if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))
    return found


def embedded_explain_engine(
    plan: ExplainPlan, settings: ImageSettings, paths: Sequence[Path], progress: ExplainProgress
) -> Iterator[tuple[int, ImageJob]]:
    """This process, one image after the other: each job explains its image into the folder it is given."""
    for position, path in enumerate(paths):
        yield position, partial(explain_image, path, plan.loaded, plan.explainers, settings)


def execute_explain(
    plan: ExplainPlan, progress: ExplainProgress | None = None, engine: ExplainEngine = embedded_explain_engine
) -> ExplainResult:
    """Explain every input of ``plan`` into its output folder (see the module docstring).

    ``engine`` turns the images still to do into jobs (:data:`ExplainEngine`), in any order; the default
    explains them here, lazily. Records and skipped inputs are reported in input order whatever the engine.
    """
    progress = progress or _Silent()
    config = plan.config
    out = Path(config.out)
    store = ExplainStore(out, plan.config_hash, config.resume)
    settings = ImageSettings(plan.target, plan.config_hash)
    records: dict[int, dict[str, Any]] = {}
    skipped: dict[int, dict[str, str]] = {}
    try:
        with store.open(on_wait=lambda: progress.waiting(out)) as removed:
            progress.start(len(plan.inputs))
            with report_progress(progress.forwards):
                todo = _place_inputs(plan, store, records, skipped, progress)
                for position, job in engine(plan, settings, [path for _, path, _ in todo], progress):
                    index, path, name = todo[position]
                    try:
                        records[index] = store.write(name, job) | {"dir": name}
                    except ImageLoadError as exc:
                        _skip(skipped, index, {"path": str(path), "error": str(exc)}, progress)
                    progress.image_done()
            ordered = [records[i] for i in sorted(records)]
            skipped_list = [skipped[i] for i in sorted(skipped)]
            render_explain_report(out / PAGE, _page_context(plan, ordered, skipped_list))
            store.write_summary({
                "images": [r["dir"] for r in ordered],
                "inputs": [{"image": r["image"], "dir": r["dir"]} for r in ordered],
                "skipped": skipped_list, "config_hash": plan.config_hash,
            })
    except OutputFolderError as exc:
        raise ExplainError(str(exc)) from exc
    return ExplainResult(out, ordered, skipped_list, removed)


def _place_inputs(
    plan: ExplainPlan, store: ExplainStore, records: dict[int, dict[str, Any]], skipped: dict[int, dict[str, str]],
    progress: ExplainProgress,
) -> list[tuple[int, Path, str]]:
    """Name every input's folder (in input order); record the reusable ones and the unreadable ones; return
    ``(input index, path, folder name)`` of the images still to explain."""
    todo = []
    for index, path in enumerate(plan.inputs):
        try:
            digest = file_digest(path)
        except OSError as exc:
            message = f"{path}: cannot read ({exc.strerror or exc})"
            _skip(skipped, index, {"path": str(path), "error": message}, progress)
            progress.image_done()
            continue
        name, done = store.locate(path, digest)
        if name is None:
            message = f"{path}: every folder name for it in {store.out} is taken"
            _skip(skipped, index, {"path": str(path), "error": message}, progress)
        elif done is None:
            todo.append((index, path, name))
            continue
        else:
            records[index] = done | {"dir": name}
        progress.image_done()
    return todo


def _skip(skipped: dict[int, dict[str, str]], index: int, entry: dict[str, str], progress: ExplainProgress) -> None:
    skipped[index] = entry
    progress.skipped(entry["error"])


def _page_context(plan: ExplainPlan, records: list[dict[str, Any]], skipped: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "title": plan.config.title,
        "model_name": plan.loaded.name,
        "model_source": plan.loaded.source,
        "device": plan.config.device,
        "version": convlens.__version__,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {name: json.dumps(e.params(), default=str) for name, e in plan.explainers.items()},
        "skipped": skipped,
        "per_block": plan.config.per_block,
        "images": [
            {"name": Path(r["image"]).name, "dir": r["dir"], "top5": r["top5"], "results": r["results"]}
            for r in records
        ],
    }

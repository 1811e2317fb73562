"""``convlens study create``: INV runs -> a study directory with every round's reveal images rendered.

INV runs are read only through :func:`convlens.inv.load_inv_explanation` and the run layout written by
``convlens explain IMAGE --methods inv --out DIR``: ``DIR/<image stem>/inv/inv.json`` with ``input.png``
(the model's view of the image) beside it. A folder that itself holds ``inv.json`` is accepted too.

Rounds: one per kept cluster (image x layer x cluster) of the chosen layers, plus ``gold`` attention-check
rounds (known answer, high reveal): for each of ``gold`` images (seeded choice), the heaviest cluster of
the deepest layer that has one, revealed at 50..100 % instead of 2..30 %. Gold rounds have no cluster id
(their plays are not measurements of a cluster). The true class of a round is the INV target class.
Everything is deterministic: the same runs and options give byte-identical rounds.json and PNGs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convlens.inv.reveal import GOLD_PERCENTAGES, REVEAL_PERCENTAGES, png_bytes, reveal_levels
from convlens.study.store.config import (
    DEFAULT_CONSENT,
    InvRunRecord,
    RoundSpec,
    StudyConfig,
    StudyFiles,
    new_secrets,
    write_secrets,
)

__all__ = ["CreateOptions", "StudyCreationError", "create_study", "find_inv_folders", "read_classes_file"]


class StudyCreationError(ValueError):
    """Bad input for ``study create`` (one clear message; nothing written)."""


@dataclass
class CreateOptions:
    """What the team chooses at creation (``None`` classes: the INV target classes found)."""

    title: str = "Deep Reveal"
    study_id: str | None = None
    study_version: str = "1"
    consent_version: str = "1"
    consent_text: str = DEFAULT_CONSENT
    classes: list[str] | None = None
    gold: int = 0
    layers: list[str] | None = None
    languages: list[str] = field(default_factory=lambda: ["en", "it"])
    plays_per_round: int = 3
    rounds_per_player: int = 20
    completion_code: str | None = None
    completion_url: str | None = None
    seed: int = 0
    one_round_per_image: bool = True


@dataclass
class _Image:
    run: str
    name: str
    folder: Path
    explanation: Any
    pixels: np.ndarray
    format_version: int


def read_classes_file(path: str | os.PathLike[str]) -> list[str]:
    """One class name per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyCreationError(f"cannot read classes file {path}: {exc}") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def find_inv_folders(run_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(image name, INV folder) pairs of one ``convlens explain --methods inv`` output folder."""
    run_dir = Path(run_dir)
    if (run_dir / "inv.json").is_file():
        name = run_dir.parent.name if run_dir.name == "inv" else run_dir.name
        return [(name, run_dir)]
    found = sorted((p.parent.parent.name, p.parent) for p in run_dir.glob("*/inv/inv.json"))
    if not found:
        raise StudyCreationError(f"{run_dir}: no INV results (expected <image>/inv/inv.json from "
                                 "`convlens explain IMAGE --methods inv --out DIR`)")
    return found


def _load_images(runs: Sequence[str | os.PathLike[str]]) -> list[_Image]:
    from convlens.inv.reader import load_inv_with_input

    images = []
    for run in runs:
        if not Path(run).is_dir():
            raise StudyCreationError(f"{run}: not a folder")
        for name, folder in find_inv_folders(run):
            try:
                explanation, pixels = load_inv_with_input(folder)
            except ValueError as exc:
                raise StudyCreationError(str(exc)) from exc
            version = int(json.loads((folder / "inv.json").read_text()).get("format_version", 0))
            images.append(_Image(Path(run).resolve().name, name, folder, explanation, pixels, version))
    return images


def _round_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _cluster_rounds(image: _Image, layers: list[str] | None) -> list[tuple[RoundSpec, np.ndarray]]:
    explanation = image.explanation
    rounds = []
    for depth, layer in enumerate(explanation.layers):
        if layers is not None and layer.name not in layers:
            continue
        for cluster in layer.clusters:
            spec = RoundSpec(
                round_id=_round_id(f"cluster:{cluster.id}"), cluster_id=cluster.id, image_id=explanation.image_id,
                image_name=image.name, layer=layer.name, layer_depth=depth, n_layers=len(explanation.layers),
                cluster_index=cluster.index, cluster_weight=float(cluster.weight), fmap_count=len(cluster.channels),
                true_class=explanation.target_name, gold=False, inv_run=image.run,
            )
            rounds.append((spec, np.asarray(cluster.feature_map)))
    return rounds


def _gold_round(image: _Image) -> tuple[RoundSpec, np.ndarray]:
    explanation = image.explanation
    deepest = next((layer for layer in reversed(explanation.layers) if layer.clusters), None)
    if deepest is None:
        raise StudyCreationError(f"{image.folder}: no layer has a cluster; it cannot give a gold round")
    spec = RoundSpec(
        round_id=_round_id(f"gold:{explanation.image_sha256}"), cluster_id=None, image_id=explanation.image_id,
        image_name=image.name, layer=None, layer_depth=None, n_layers=len(explanation.layers), cluster_index=None,
        cluster_weight=None, fmap_count=None, true_class=explanation.target_name, gold=True, inv_run=image.run,
    )
    return spec, np.asarray(deepest.clusters[0].feature_map)


def _check_classes(images: list[_Image], classes: list[str] | None) -> list[str]:
    for image in images:
        if not image.explanation.target_name:
            raise StudyCreationError(f"{image.folder}: the INV result has no target class name (explain with a "
                                     "model that has class names)")
    targets = sorted({image.explanation.target_name for image in images})
    if classes is None:
        classes = targets
    missing = [t for t in targets if t not in classes]
    if missing:
        raise StudyCreationError(f"target classes {missing} are not in the study's classes {classes}")
    if len(classes) < 2:
        raise StudyCreationError(f"a study needs at least two classes to guess from, got {classes}; pass --classes")
    return list(classes)


def _check_layers(images: list[_Image], layers: list[str] | None) -> None:
    if layers is None:
        return
    known = {layer.name for image in images for layer in image.explanation.layers}
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise StudyCreationError(f"layers {unknown} are in no INV run; layers found: {sorted(known)}")


def _plan(images: list[_Image], options: CreateOptions) -> list[tuple[RoundSpec, np.ndarray, _Image]]:
    planned: list[tuple[RoundSpec, np.ndarray, _Image]] = []
    for image in images:
        planned += [(spec, fmap, image) for spec, fmap in _cluster_rounds(image, options.layers)]
    if not 0 <= options.gold <= len(images):
        raise StudyCreationError(f"--gold {options.gold}: must be between 0 and the number of images ({len(images)})")
    order = sorted(range(len(images)), key=lambda i: images[i].explanation.image_sha256)
    chosen = np.random.default_rng(options.seed).choice(len(images), options.gold, replace=False)
    for i in sorted(order[int(c)] for c in chosen):
        spec, fmap = _gold_round(images[i])
        planned.append((spec, fmap, images[i]))
    ids = [spec.round_id for spec, _, _ in planned]
    if len(set(ids)) != len(ids):
        raise StudyCreationError("the same image/cluster appears twice in the INV runs; "
                                 "a study's rounds must be unique")
    if not any(not spec.gold for spec, _, _ in planned):
        raise StudyCreationError("the chosen INV runs and layers give no cluster to play")
    return planned


def _render(root: Path, planned: list[tuple[RoundSpec, np.ndarray, _Image]]) -> None:
    images = root / "images"
    for spec, fmap, image in planned:
        folder = images / spec.round_id
        folder.mkdir(parents=True)
        percentages = GOLD_PERCENTAGES if spec.gold else REVEAL_PERCENTAGES
        for level, pixels in enumerate(reveal_levels(image.pixels, fmap, percentages)):
            (folder / f"level{level}.png").write_bytes(png_bytes(pixels))
        (folder / "full.png").write_bytes(png_bytes(image.pixels))


def _config(images: list[_Image], classes: list[str], options: CreateOptions, study_id: str) -> StudyConfig:
    import convlens

    runs: dict[str, InvRunRecord] = {}
    for image in images:
        path = str(image.folder.parent.parent) if image.folder.name == "inv" else str(image.folder)
        record = runs.setdefault(path, InvRunRecord(path=path, name=image.run, format_version=image.format_version,
                                                    images=0, layers=[]))
        record.images += 1
        record.layers = record.layers or [layer.name for layer in image.explanation.layers]
    return StudyConfig(
        study_id=study_id, title=options.title, study_version=options.study_version,
        consent_version=options.consent_version, consent_text=options.consent_text, classes=classes,
        languages=options.languages, plays_per_round=options.plays_per_round,
        rounds_per_player=options.rounds_per_player, completion_code=options.completion_code,
        completion_url=options.completion_url, assignment_seed=options.seed,
        one_round_per_image=options.one_round_per_image,
        reveal_percentages=list(REVEAL_PERCENTAGES), gold_percentages=list(GOLD_PERCENTAGES),
        layer_choice=options.layers, inv_runs=list(runs.values()), convlens_version=convlens.__version__,
    )


def identical_level0_images(root: Path, round_ids: Sequence[str]) -> list[list[str]]:
    """Groups of rounds whose level-0 images are byte-identical (players cannot tell those rounds apart)."""
    groups: dict[str, list[str]] = {}
    for round_id in round_ids:
        digest = hashlib.sha256((root / "images" / round_id / "level0.png").read_bytes()).hexdigest()
        groups.setdefault(digest, []).append(round_id)
    return [ids for ids in groups.values() if len(ids) > 1]


def create_study(study_dir: str | os.PathLike[str], runs: Sequence[str | os.PathLike[str]],
                 options: CreateOptions | None = None) -> dict[str, Any]:
    """Build ``study_dir`` from INV ``runs``; returns a summary with the admin token (shown once)."""
    options = options or CreateOptions()
    study_dir = Path(study_dir)
    if study_dir.exists() and any(study_dir.iterdir()):
        raise StudyCreationError(f"{study_dir} exists and is not empty; choose a new study folder")
    if not runs:
        raise StudyCreationError("no INV run given (--from DIR)")
    images = _load_images(runs)
    classes = _check_classes(images, options.classes)
    _check_layers(images, options.layers)
    planned = _plan(images, options)
    study_id = options.study_id or (re.sub(r"[^A-Za-z0-9_.-]+", "-", study_dir.resolve().name)[:64] or "study")
    config = _config(images, classes, options, study_id)
    study_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".study-", dir=study_dir.parent))
    try:
        _render(tmp, planned)
        rounds = {"rounds": [spec.model_dump() for spec, _, _ in planned]}
        (tmp / "rounds.json").write_text(json.dumps(rounds, indent=2, sort_keys=True))
        (tmp / "study.json").write_text(config.model_dump_json(indent=2))
        secrets = new_secrets()
        write_secrets(tmp, secrets)
        if study_dir.exists():
            study_dir.rmdir()
        tmp.rename(study_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = StudyFiles(study_dir)
    gold = sum(spec.gold for spec, _, _ in planned)
    shared = identical_level0_images(files.root, [spec.round_id for spec, _, _ in planned])
    notes = [f"{sum(map(len, shared))} rounds in {len(shared)} groups share a byte-identical level-0 image (players "
             "cannot tell the rounds of a group apart at the first level)"] if shared else []
    return {"study_dir": str(files.root), "rounds": len(planned) - gold, "gold_rounds": gold,
            "images": len(images), "classes": classes, "admin_token": secrets.admin_token,
            "identical_level0": shared, "notes": notes}

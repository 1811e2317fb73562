"""Regions of a Deep Reveal study for TCAV: where the labels' clusters are, what each image looked like to
the model, and whether a model reproduces the study's INV runs (:mod:`convlens.tcav.study_concepts`
builds the concept sets from these).

Reads a labels folder (:mod:`convlens.labels.files`) and the INV runs it records, through
:func:`~convlens.inv.load_inv_explanation` only; an image's ``input.png`` is its model view (resized and
centre-cropped, before normalisation), so its model input is ``normalise(pixels / 255)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.core.hooks import eval_mode
from convlens.inv.reader import find_run_root, index_inv_folders, load_inv_with_input
from convlens.inv.results import InvExplanation
from convlens.labels.files import SEP, LabelsFolder
from convlens.models.preprocessing import Preprocessing

__all__ = [
    "ModelCheck",
    "Region",
    "Reveal",
    "StudyConceptError",
    "StudyImage",
    "check_model",
    "find_study_images",
    "label_regions",
    "model_input",
    "needed_images",
    "reveal_percentages",
]

Reveal = Callable[[np.ndarray, np.ndarray, float], np.ndarray]



class StudyConceptError(ValueError):
    """A labels folder, INV run or option that cannot give concept sets (the message says why)."""


@dataclass(frozen=True)
class Region:
    """One revealed region: cluster ``cluster_id`` (best label ``label``) at reveal ``level`` (``percent`` %)."""

    class_name: str
    label: str
    cluster_id: str
    image_id: str
    layer: str
    inv_run: str
    level: int
    percent: float


@dataclass
class StudyImage:
    """A study image: its INV folder, explanation and ``input.png`` pixels (H, W, 3) uint8."""

    image_id: str
    folder: Path
    explanation: InvExplanation
    pixels: np.ndarray


def model_input(preprocessing: Preprocessing) -> Callable[[np.ndarray], torch.Tensor]:
    """(H, W, 3) uint8 pixels already at the model's input size -> the model's (3, H, W) input: the
    arithmetic of ``Preprocessing.__call__`` after its resize and crop (float32 / 255, then normalise)."""

    def convert(pixels: np.ndarray) -> torch.Tensor:
        array = np.asarray(pixels, dtype=np.float32) / 255.0
        return preprocessing.normalize(torch.from_numpy(array).permute(2, 0, 1).contiguous())

    return convert


def reveal_percentages(folder: LabelsFolder, default: Sequence[float] | None = None) -> list[float]:
    """The study's reveal percentages per level (``study.json``'s ``reveal_levels``), else ``default``."""
    levels = (folder.manifest.get("study") or {}).get("reveal_levels")
    if isinstance(levels, dict) and levels:
        try:
            return [float(levels[str(i)]) for i in range(len(levels))]
        except (KeyError, TypeError, ValueError) as exc:
            raise StudyConceptError(f"labels.json: unreadable study reveal_levels {levels!r}") from exc
    if default is None:
        raise StudyConceptError("the labels folder's study records no reveal levels and none were given")
    return [float(q) for q in default]


def label_regions(folder: LabelsFolder, percentages: Sequence[float]) -> dict[str, dict[str, list[Region]]]:
    """Per class and best label, the regions of its clusters (one per cluster) with their reveal level."""
    mean_levels = {(r["cluster_id"], r["label"]): r.get("mean_level", "") for r in folder.label_scores}
    found: dict[str, dict[str, list[Region]]] = defaultdict(lambda: defaultdict(list))
    for row in folder.clusters:
        for label in [text for text in (row.get("best_labels") or "").split(SEP) if text]:
            text = mean_levels.get((row["cluster_id"], label), "")
            try:
                mean = float(text)
            except ValueError:
                raise StudyConceptError(f"label_scores.csv: no mean level for label {label!r} of cluster "
                                        f"{row['cluster_id']}") from None
            level = min(max(math.ceil(round(mean, 9)), 0), len(percentages) - 1)
            found[row["class"]][label].append(Region(row["class"], label, row["cluster_id"], row["image_id"],
                                                     row["layer"], row.get("inv_run", ""), level, percentages[level]))
    return {name: dict(labels) for name, labels in found.items()}


def _run_root(run: str, recorded: Mapping[str, Any], inv_root: Path | None) -> Path:
    root = find_run_root(run, recorded, inv_root)
    if root is None:
        where = recorded.get(run, "nowhere: the labels folder does not name it")
        raise StudyConceptError(f"INV run {run!r} not found (recorded at {where}); pass --inv-root FOLDER")
    return root


def _load_image(image_id: str, folder: Path) -> StudyImage:
    try:
        explanation, pixels = load_inv_with_input(folder)
    except ValueError as exc:
        raise StudyConceptError(f"{exc} (image {image_id})") from exc
    if tuple(pixels.shape[:2]) != tuple(explanation.input_size):
        raise StudyConceptError(f"{folder}: input.png is {pixels.shape[1]}x{pixels.shape[0]}, the INV run's input "
                                f"{explanation.input_size[1]}x{explanation.input_size[0]}")
    return StudyImage(image_id, folder, explanation, pixels)


def needed_images(folder: LabelsFolder, classes: Sequence[str] | None = None) -> dict[str, set[str]]:
    """INV run name -> ids of the images with a labelled cluster (of ``classes``, default all)."""
    needed: dict[str, set[str]] = defaultdict(set)
    for row in folder.clusters:
        if (row.get("best_labels") or "").strip() and (classes is None or row["class"] in classes):
            needed[row.get("inv_run", "")].add(row["image_id"])
    return dict(needed)


def find_study_images(
    folder: LabelsFolder, needed: Mapping[str, set[str]], inv_root: str | Path | None = None
) -> dict[str, StudyImage]:
    """The INV folders of ``needed`` (run name -> image ids), from the runs ``labels.json`` records."""
    recorded = folder.manifest.get("inv_runs") or {}
    root_override = Path(inv_root) if inv_root is not None else None
    images: dict[str, StudyImage] = {}
    for run, image_ids in sorted(needed.items()):
        root = _run_root(run, recorded, root_override)
        index = index_inv_folders(root)  # an unreadable folder only matters if a needed image is in it
        for image_id in sorted(image_ids):
            location = index.get(image_id) or index.get(image_id[:16])
            if location is None:
                raise StudyConceptError(f"image {image_id} of INV run {run!r} has no INV folder under {root}")
            images[image_id] = _load_image(image_id, location)
    return images


@dataclass(frozen=True)
class ModelCheck:
    """The model's score of an INV run's image against the score the run recorded."""

    image_id: str
    recorded: float
    computed: float

    @property
    def matches(self) -> bool:
        return abs(self.computed - self.recorded) <= 1e-3 * max(1.0, abs(self.recorded))


def check_model(model: nn.Module, images: Mapping[str, StudyImage],
                to_input: Callable[[np.ndarray], torch.Tensor]) -> list[ModelCheck]:
    """Score every image's INV target with ``model`` (the run's score: logit, softmax or sigmoid): the
    model, its weights and the input construction reproduce the INV run only if every check matches."""
    device = next(model.parameters(), torch.empty(0)).device
    checks = []
    with eval_mode(model), torch.no_grad():
        for image_id, image in sorted(images.items()):
            explanation = image.explanation
            logits = model(to_input(image.pixels)[None].to(device))[0].float().cpu()
            kind = str(explanation.params.get("score", "logit"))
            scores = logits.softmax(0) if kind == "softmax" else logits.sigmoid() if kind == "sigmoid" else logits
            checks.append(ModelCheck(image_id, float(explanation.score), float(scores[int(explanation.target)])))
    return checks

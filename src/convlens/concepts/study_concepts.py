"""Concept sets for TCAV built from a Deep Reveal study's own labels (the crowd's concepts, Kim et al. 2018's P_C).

**Region.** What one INV cluster showed the players who named it: the study image — the INV run's
``input.png``, the model's view (resized and centre-cropped, before normalisation) — revealed through
the cluster map A_C exactly as the game revealed it (the ``reveal`` function given, Deep Reveal's mask:
nearest-neighbour up-sampling of the h x w map, threshold at the (100 - q)-th percentile, Gaussian-blurred
mask, black elsewhere; Bianchi et al. 2024), at reveal level ``ceil(mean level of the plays that gave the
label in that cluster)`` — where those players guessed, rounded like the authors' cluster reveal level.
Its tensor is the model's input of that picture: ``normalise(pixels / 255)`` with the model's mean and
std, the same arithmetic as the model's preprocessing of an image already at its input size (no second
resize or crop).

**Concept** (class k, label L): the regions of every cluster of class k whose best labels include L, one
per cluster, distinct images only, sampled without replacement (seeded) to the largest of a few common
sizes (default 10, 20, 40) that the concept fills and that leaves the class's pool at least twice as
large. Few sizes keep the null cheap: it costs N(N-1)/2 CAVs per layer per distinct size. A label with
too few regions is skipped, with the reason recorded (:class:`SkippedConcept`).

**Random sets** (class k): the same construction, drawn from the *pool* of every labelled region of class
k (each cluster with a best label, at that label's level; the concept's own regions included).

**Inputs** X_k: the study's images of class k (the full ``input.png``), whose class-k gradients TCAV tests.

*Why masked images, not crops.* The masked image is what the players saw when they named the label, at
the position and scale the model sees it; a crop would have to be enlarged to the model's input (a 2 %
region blown up 7 times, a scale the model never saw) or pasted on a canvas (a context nobody saw). And
as every concept and random image is made the same way (black outside a revealed region), a CAV can
only separate them by what is revealed, not by how the picture was made.

*Why the class's own regions as random pool.* INV's clusters are chosen by class-k gradients: every
region of a class-k image is where the network found class-k evidence. Random regions of *other*
classes would make almost any label of class k look "used" — the test would answer "are class-k regions
used for class k", true by construction. Drawn from the class's own labelled regions, the test asks what
the crowd's label adds: are the regions the crowd calls L used for class k more (direction ``positive``)
or less (``negative``) than the class's revealed regions at large? Under H0 (the label picks regions as
a random draw would) the concept is exchangeable with the random sets — the case the random-vs-random
null of :mod:`convlens.concepts.tcav_stats` is built for. Hence a class needs two labels or more; a label
covering most of its class's regions is tested against sets that are mostly itself (little power, still
a valid test). Clusters without a best label are left out: no label was given at any level.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.concepts.concept_sets import ConceptSet, RandomSets, tensor_digest
from convlens.concepts.label_files import SEP, LabelsFolder
from convlens.concepts.manifest import load_inv_explanation, read_manifest
from convlens.concepts.results import InvExplanation
from convlens.core.hooks import eval_mode
from convlens.models.preprocessing import Preprocessing

__all__ = [
    "CONSTRUCTION",
    "DEFAULT_SIZES",
    "ModelCheck",
    "Region",
    "SkippedConcept",
    "StudyConceptError",
    "StudyConcepts",
    "StudyImage",
    "build_study_concepts",
    "check_model",
    "chosen_classes",
    "concept_size",
    "find_study_images",
    "label_regions",
    "model_input",
    "needed_images",
    "reveal_percentages",
]

DEFAULT_SIZES: tuple[int, ...] = (10, 20, 40)
CONSTRUCTION = (
    "concept (class k, label L): the clusters of class k whose best labels include L; each gives the INV "
    "run's input.png revealed through the cluster map by Deep Reveal's mask at level ceil(mean level of the "
    "plays that gave L in that cluster), normalised like the model's input; distinct images, sampled (seeded) "
    "to the largest common size the concept fills with a pool at least twice as large. Random sets: the same "
    "construction over every labelled region of class k (pool). Inputs: the study's images of class k."
)
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


@dataclass(frozen=True)
class SkippedConcept:
    """A label (or a whole class, ``label`` empty) that was not tested, and why."""

    class_name: str
    label: str
    regions: int
    reason: str


@dataclass
class StudyImage:
    """A study image: its INV folder, explanation and ``input.png`` pixels (H, W, 3) uint8."""

    image_id: str
    folder: Path
    explanation: InvExplanation
    pixels: np.ndarray


@dataclass
class StudyConcepts:
    """Everything :class:`~convlens.concepts.tcav.TCAVRunner` needs, with the record of how it was built."""

    class_ids: dict[str, int]
    class_inputs: dict[int, torch.Tensor]
    concepts: dict[int, list[ConceptSet]]
    random_sets: dict[int, RandomSets]
    regions: dict[tuple[str, str], list[Region]]  # the regions behind each tested concept's images, in order
    available: dict[tuple[str, str], int]  # distinct regions each label had before sampling
    pools: dict[str, int]
    skipped: list[SkippedConcept]
    images: dict[str, StudyImage]
    percentages: list[float]
    sizes: tuple[int, ...]
    seed: int
    random_runs: int = 20

    @property
    def class_names(self) -> list[str]:
        """Names indexed by class id (``"class <k>"`` for ids not in the study)."""
        names = [f"class {k}" for k in range(max(self.class_ids.values(), default=-1) + 1)]
        for name, k in self.class_ids.items():
            names[k] = name
        return names

    @property
    def models(self) -> list[str]:
        """Distinct model names recorded by the INV runs (empty when none recorded one)."""
        return sorted({i.explanation.model for i in self.images.values() if i.explanation.model})

    def describe(self) -> dict[str, Any]:
        """The construction, per class and concept what was used, and what was skipped (for ``tcav.json``)."""
        classes: dict[str, Any] = {}
        for name, k in self.class_ids.items():
            concepts = {c.name: {"available": self.available[(name, c.name)], "size": c.size,
                                 "regions": [{"cluster_id": r.cluster_id, "level": r.level, "percent": r.percent}
                                             for r in self.regions[(name, c.name)]]}
                        for c in self.concepts.get(k, [])}
            inputs = self.class_inputs.get(k)
            classes[name] = {"class_id": k, "inputs": 0 if inputs is None else int(inputs.shape[0]),
                             "pool": self.pools.get(name, 0),
                             "concepts": concepts}
        return {"construction": CONSTRUCTION, "reveal_percentages": self.percentages, "sizes": list(self.sizes),
                "seed": self.seed, "classes": classes, "skipped": [asdict(s) for s in self.skipped]}


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
    candidates = [inv_root / run, inv_root] if inv_root is not None else []
    if run in recorded:
        candidates.append(Path(recorded[run]))
    root = next((c for c in candidates if c.is_dir()), None)
    if root is None:
        where = recorded.get(run, "nowhere: the labels folder does not name it")
        raise StudyConceptError(f"INV run {run!r} not found (recorded at {where}); pass --inv-root FOLDER")
    return root


def _index_run(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for manifest in sorted(root.rglob("inv.json")):
        try:
            image_id = str(read_manifest(manifest.parent)["image_id"])
        except (OSError, ValueError, KeyError):
            continue  # an unreadable folder only matters if a needed image is in it: reported below
        found.setdefault(image_id, manifest.parent)
        found.setdefault(image_id[:16], manifest.parent)
    return found


def _load_image(image_id: str, folder: Path) -> StudyImage:
    from PIL import Image

    try:
        explanation = load_inv_explanation(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise StudyConceptError(f"{folder}: unreadable INV result ({exc})") from exc
    if not (folder / "input.png").is_file():
        raise StudyConceptError(f"{folder}: no input.png (the model's view of image {image_id} is needed)")
    with Image.open(folder / "input.png") as image:
        pixels = np.asarray(image.convert("RGB"))
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
        index = _index_run(root)
        for image_id in sorted(image_ids):
            location = index.get(image_id) or index.get(image_id[:16])
            if location is None:
                raise StudyConceptError(f"image {image_id} of INV run {run!r} has no INV folder under {root}")
            images[image_id] = _load_image(image_id, location)
    return images


def concept_size(distinct: int, pool: int, sizes: Sequence[int], random_runs: int = 20) -> int | None:
    """The largest size s of ``sizes`` with s <= ``distinct``, 2 s <= ``pool`` and more than ``random_runs``
    distinct sets of s in the pool (None if there is none)."""
    fitting = [s for s in sizes if s <= distinct and 2 * s <= pool and math.comb(pool, s) > random_runs]
    return max(fitting) if fitting else None


def _size_reason(distinct: int, pool: int, sizes: Sequence[int], random_runs: int) -> str:
    smallest = min(sizes)
    if distinct < smallest:
        return f"{distinct} distinct region(s), fewer than the smallest concept size {smallest}"
    if 2 * smallest > pool:
        return f"the class's random pool has {pool} regions, fewer than 2 x {smallest}"
    return f"the class's random pool of {pool} regions has too few distinct sets of {smallest} for {random_runs} runs"


class _Renderer:
    """Region -> model input tensor, computed once per (cluster, level)."""

    def __init__(self, images: Mapping[str, StudyImage], to_input: Callable[[np.ndarray], torch.Tensor],
                 reveal: Reveal) -> None:
        self.images, self.to_input, self.reveal = images, to_input, reveal
        self._done: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}

    def pixels(self, region: Region) -> np.ndarray:
        image = self.images[region.image_id]
        try:
            cluster = image.explanation.cluster(region.cluster_id)
        except KeyError:
            raise StudyConceptError(f"cluster {region.cluster_id} is not in the INV folder {image.folder}") from None
        if cluster.feature_map is None:
            raise StudyConceptError(f"cluster {region.cluster_id} has no map in {image.folder}")
        return self.reveal(image.pixels, np.asarray(cluster.feature_map), region.percent)

    def __call__(self, region: Region) -> tuple[str, torch.Tensor]:
        key = (region.cluster_id, region.level)
        if key not in self._done:
            tensor = self.to_input(self.pixels(region)).float()
            self._done[key] = (tensor_digest(tensor), tensor)
        return self._done[key]


def _distinct(regions: Sequence[Region], render: _Renderer) -> tuple[list[Region], list[torch.Tensor]]:
    """Regions whose images differ (first of equal images kept), in cluster-id order, with their tensors."""
    seen: dict[str, tuple[Region, torch.Tensor]] = {}
    for region in sorted(regions, key=lambda r: (r.cluster_id, r.level)):
        digest, tensor = render(region)
        seen.setdefault(digest, (region, tensor))
    return [r for r, _ in seen.values()], [t for _, t in seen.values()]


def _label_seed(seed: int, class_name: str, label: str) -> np.random.Generator:
    key = int(hashlib.sha256(f"{class_name}\x00{label}".encode()).hexdigest()[:15], 16)
    return np.random.default_rng([seed, key])


def _build_class(result: StudyConcepts, name: str, labels: Mapping[str, list[Region]], render: _Renderer) -> None:
    class_id = result.class_ids[name]
    pool_regions = {(r.cluster_id, r.level): r for regions in labels.values() for r in regions}
    _, pool = _distinct(list(pool_regions.values()), render)
    result.pools[name] = len(pool)
    tested: list[ConceptSet] = []
    for label in sorted(labels):
        regions, tensors = _distinct(labels[label], render)
        result.available[(name, label)] = len(regions)
        size = concept_size(len(regions), len(pool), result.sizes, result.random_runs)
        if size is None:
            reason = _size_reason(len(regions), len(pool), result.sizes, result.random_runs)
            result.skipped.append(SkippedConcept(name, label, len(regions), reason))
            continue
        rows = np.sort(_label_seed(result.seed, name, label).choice(len(regions), size, replace=False))
        tested.append(ConceptSet(label, torch.stack([tensors[i] for i in rows])))
        result.regions[(name, label)] = [regions[i] for i in rows]
    if tested:  # only classes with a tested concept enter the run
        result.concepts[class_id] = tested
        result.random_sets[class_id] = RandomSets(torch.stack(pool), seed=result.seed)
    images = sorted((i for i in result.images.values() if i.explanation.target_name == name), key=lambda i: i.image_id)
    result.class_inputs[class_id] = torch.stack([render.to_input(i.pixels).float() for i in images])


def chosen_classes(folder: LabelsFolder, classes: Sequence[str] | None = None) -> list[str]:
    """The classes to test (``classes``, default every class with a labelled cluster); StudyConceptError
    for a folder without labels, an unknown class, or a class with a single concept."""
    labels: dict[str, set[str]] = defaultdict(set)
    for row in folder.clusters:
        labels[row["class"]].update(text for text in (row.get("best_labels") or "").split(SEP) if text)
    all_classes = list(labels)
    return _choose_classes({k: v for k, v in labels.items() if v}, all_classes, classes)


def _choose_classes(regions: Mapping[str, Collection[str]], all_classes: Sequence[str],
                    classes: Sequence[str] | None) -> list[str]:
    if not regions:
        raise StudyConceptError("the labels folder has no labelled cluster (no best label in clusters.csv): "
                                "there is no concept to test")
    if classes is not None:
        unknown = [c for c in classes if c not in all_classes]
        if unknown:
            raise StudyConceptError(f"classes {unknown} are not in the labels folder; its classes: {list(all_classes)}")
        empty = [c for c in classes if c not in regions]
        if empty:
            raise StudyConceptError(f"classes {empty} have no labelled cluster: nothing to test")
    chosen = list(classes) if classes is not None else sorted(regions)
    for name in chosen:
        if len(regions[name]) == 1:
            (label,) = regions[name]
            raise StudyConceptError(
                f"class {name!r} has one concept ({label!r}): TCAV tests a class's concepts against random sets "
                "of the class's own labelled regions, which would be that concept's regions; leave the class "
                "out with --classes")
    return chosen


def _class_ids(images: Mapping[str, StudyImage], chosen: Sequence[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for image in images.values():
        name, target = image.explanation.target_name, int(image.explanation.target)
        if name in chosen and ids.setdefault(name, target) != target:
            raise StudyConceptError(f"class {name!r} is target {ids[name]} in one INV run and {target} in another")
    missing = [name for name in chosen if name not in ids]
    if missing:
        raise StudyConceptError(f"classes {missing} are the INV target of none of their clusters' images")
    return ids


def build_study_concepts(
    folder: LabelsFolder,
    to_input: Callable[[np.ndarray], torch.Tensor],
    reveal: Reveal,
    *,
    percentages: Sequence[float] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    random_runs: int = 20,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    inv_root: str | Path | None = None,
    images: Mapping[str, StudyImage] | None = None,
) -> StudyConcepts:
    """Concept sets, random pools and inputs of every chosen class (see the module docstring).

    Args:
        folder: a labels folder (:func:`~convlens.concepts.label_files.read_labels`).
        to_input: (H, W, 3) uint8 -> the model's (3, H, W) input (:func:`model_input`).
        reveal: ``reveal(image, cluster_map, percent) -> (H, W, 3) uint8``, the game's reveal
            (``convlens.study.reveal.reveal_image``).
        percentages: reveal percentage per level when the labels folder's study does not record them.
        sizes: the common concept sizes (each >= 2).
        random_runs: random sets per concept the pool must be able to give (distinct, besides the concept).
        classes: classes to test (default: every class with a labelled cluster).
        inv_root: where to look for the INV runs instead of the recorded paths.
        images: study images found already (:func:`find_study_images`); the others are looked up.
    """
    if not sizes or any(int(s) < 2 for s in sizes):
        raise StudyConceptError(f"concept sizes must be integers >= 2, got {list(sizes)}")
    steps = reveal_percentages(folder, percentages)
    regions = label_regions(folder, steps)
    all_classes = list(dict.fromkeys(row["class"] for row in folder.clusters))
    chosen = _choose_classes(regions, all_classes, classes)
    known = dict(images or {})
    missing = {run: ids - set(known) for run, ids in needed_images(folder, chosen).items() if ids - set(known)}
    known.update(find_study_images(folder, missing, inv_root))
    result = StudyConcepts(_class_ids(known, chosen), {}, {}, {}, {}, {}, {}, [], known, steps,
                           tuple(sorted({int(s) for s in sizes})), seed, random_runs)
    result.skipped += [SkippedConcept(c, "", 0, "no cluster of this class has a best label")
                       for c in all_classes if c not in regions and classes is None]
    render = _Renderer(known, to_input, reveal)
    for name in chosen:
        _build_class(result, name, regions[name], render)
    if not any(result.concepts.values()):
        reasons = "; ".join(f"{s.class_name}/{s.label or '-'}: {s.reason}" for s in result.skipped[:6])
        raise StudyConceptError(f"no concept can be tested ({reasons}); try smaller --sizes")
    return result


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

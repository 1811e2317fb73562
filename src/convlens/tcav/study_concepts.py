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

**Random sets** (class k): the same construction, drawn from a *pool* of regions: by default
(``random_pool="class"``) every labelled region of class k (each cluster with a best label, at that
label's level; the concept's own regions included); with ``random_pool="study"`` every labelled region
of every class of the study (one pool for all classes, whose random-vs-random CAVs are then shared).

**Inputs** X_k: the study's images of class k (the full ``input.png``), whose class-k gradients TCAV tests.

*Why masked images, not crops.* The masked image is what the players saw when they named the label, at
the position and scale the model sees it; a crop would have to be enlarged to the model's input (a 2 %
region blown up 7 times, a scale the model never saw) or pasted on a canvas (a context nobody saw). And
as every concept and random image is made the same way (black outside a revealed region), a CAV can
only separate them by what is revealed, not by how the picture was made.

*Why the class's own regions as default pool.* INV's clusters are chosen by class-k gradients: every
region of a class-k image is where the network found class-k evidence. Random regions of *other*
classes make labels of class k look "used" for want of a fair comparison: they carry the other classes'
evidence, which pushes class k down, so even class-k regions without any class-k evidence come out
"used (+)" (in a simulated study on the synthetic benchmark, regions showing next to none of the class
object did in all four classes, against other classes' regions; in one of four against the whole study's:
``benchmarks/bench_tcav.py --study``). Drawn from the class's own labelled regions, the test asks what
the crowd's label adds: are the regions the crowd calls L used for class k more (direction
``positive``) or less (``negative``) than the class's revealed regions at large? Under H0 (the label
picks regions as a random draw would) the concept is exchangeable with the random sets — the case the
random-vs-random null of :mod:`convlens.tcav.stats` is built for. Hence a class needs two
labels or more; a label covering most of its class's regions is tested against sets that are mostly
itself (little power, still a valid test). ``random_pool="study"`` is Kim et al.'s reading (random
counterexamples from everywhere): "used (+)" then means used for class k more than random study
regions, with the other-classes caveat above diluted by the class's own share of the study. Clusters
without a best label are left out: no label was given at any level.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.labels.files import SEP, LabelsFolder
from convlens.tcav.concept_sets import ConceptSet, RandomSets, tensor_digest
from convlens.tcav.study_regions import (
    ModelCheck,
    Region,
    Reveal,
    StudyConceptError,
    StudyImage,
    check_model,
    find_study_images,
    label_regions,
    model_input,
    needed_images,
    reveal_percentages,
)

__all__ = [
    "CONSTRUCTION",
    "DEFAULT_SIZES",
    "RANDOM_POOLS",
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
RANDOM_POOLS = ("class", "study")
CONSTRUCTION = (
    "concept (class k, label L): the clusters of class k whose best labels include L; each gives the INV "
    "run's input.png revealed through the cluster map by Deep Reveal's mask at level ceil(mean level of the "
    "plays that gave L in that cluster), normalised like the model's input; distinct images, sampled (seeded) "
    "to the largest common size the concept fills with a pool at least twice as large. Random sets: the same "
    "construction over every labelled region of class k (random_pool 'class') or of the study ('study'). "
    "Inputs: the study's images of class k."
)


@dataclass(frozen=True)
class SkippedConcept:
    """A label (or a whole class, ``label`` empty) that was not tested, and why."""

    class_name: str
    label: str
    regions: int
    reason: str


@dataclass
class StudyConcepts:
    """Everything :class:`~convlens.tcav.runner.TCAVRunner` needs, with the record of how it was built."""

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
    random_pool: str = "class"

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
        return recorded_models(self.images)

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
        return {"construction": CONSTRUCTION, "random_pool": self.random_pool,
                "reveal_percentages": self.percentages, "sizes": list(self.sizes),
                "seed": self.seed, "classes": classes, "skipped": [asdict(s) for s in self.skipped]}


def recorded_models(images: Mapping[str, StudyImage]) -> list[str]:
    """Distinct model names the INV runs of ``images`` recorded, sorted (empty when none recorded one)."""
    return sorted({str(i.explanation.model) for i in images.values() if i.explanation.model})


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


def _pool(regions: Iterable[Region], render: _Renderer) -> list[torch.Tensor]:
    """Distinct images of ``regions`` (one per cluster and level)."""
    unique = {(r.cluster_id, r.level): r for r in regions}
    return _distinct(list(unique.values()), render)[1]


def _build_class(result: StudyConcepts, name: str, labels: Mapping[str, list[Region]], render: _Renderer,
                 pool: RandomSets) -> None:
    class_id = result.class_ids[name]
    size_of_pool = int(pool.pool.shape[0])
    result.pools[name] = size_of_pool
    tested: list[ConceptSet] = []
    for label in sorted(labels):
        regions, tensors = _distinct(labels[label], render)
        result.available[(name, label)] = len(regions)
        size = concept_size(len(regions), size_of_pool, result.sizes, result.random_runs)
        if size is None:
            reason = _size_reason(len(regions), size_of_pool, result.sizes, result.random_runs)
            result.skipped.append(SkippedConcept(name, label, len(regions), reason))
            continue
        rows = np.sort(_label_seed(result.seed, name, label).choice(len(regions), size, replace=False))
        tested.append(ConceptSet(label, torch.stack([tensors[i] for i in rows])))
        result.regions[(name, label)] = [regions[i] for i in rows]
    if tested:  # only classes with a tested concept enter the run
        result.concepts[class_id] = tested
        result.random_sets[class_id] = pool
    images = sorted((i for i in result.images.values() if i.explanation.target_name == name), key=lambda i: i.image_id)
    result.class_inputs[class_id] = torch.stack([render.to_input(i.pixels).float() for i in images])


def chosen_classes(folder: LabelsFolder, classes: Sequence[str] | None = None, random_pool: str = "class") -> list[str]:
    """The classes to test (``classes``, default every class with a labelled cluster); StudyConceptError
    for a folder without labels, an unknown class, or a class with a single concept."""
    labels: dict[str, set[str]] = defaultdict(set)
    for row in folder.clusters:
        labels[row["class"]].update(text for text in (row.get("best_labels") or "").split(SEP) if text)
    all_classes = list(labels)
    return _choose_classes({k: v for k, v in labels.items() if v}, all_classes, classes, random_pool)


def _choose_classes(regions: Mapping[str, Collection[str]], all_classes: Sequence[str],
                    classes: Sequence[str] | None, random_pool: str = "class") -> list[str]:
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
        if random_pool == "class" and len(regions[name]) == 1:
            (label,) = regions[name]
            raise StudyConceptError(
                f"class {name!r} has one concept ({label!r}): TCAV tests a class's concepts against random sets "
                "of the class's own labelled regions, which would be that concept's regions; leave the class "
                "out with --classes (or draw random sets from the whole study: --random-pool study)")
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
    random_pool: str = "class",
) -> StudyConcepts:
    """Concept sets, random pools and inputs of every chosen class (see the module docstring).

    Args:
        folder: a labels folder (:func:`~convlens.labels.files.read_labels`).
        to_input: (H, W, 3) uint8 -> the model's (3, H, W) input (:func:`model_input`).
        reveal: ``reveal(image, cluster_map, percent) -> (H, W, 3) uint8``, the game's reveal
            (``convlens.inv.reveal.reveal_image``).
        percentages: reveal percentage per level when the labels folder's study does not record them.
        sizes: the common concept sizes (each >= 2).
        random_runs: random sets per concept the pool must be able to give (distinct, besides the concept).
        classes: classes to test (default: every class with a labelled cluster).
        inv_root: where to look for the INV runs instead of the recorded paths.
        images: study images found already (:func:`find_study_images`); the others are looked up.
        random_pool: ``"class"`` (every labelled region of the concept's class) or ``"study"`` (of every class).
    """
    if not sizes or any(int(s) < 2 for s in sizes):
        raise StudyConceptError(f"concept sizes must be integers >= 2, got {list(sizes)}")
    if random_pool not in RANDOM_POOLS:
        raise StudyConceptError(f"random pool must be one of {', '.join(RANDOM_POOLS)}, got {random_pool!r}")
    steps = reveal_percentages(folder, percentages)
    regions = label_regions(folder, steps)
    all_classes = list(dict.fromkeys(row["class"] for row in folder.clusters))
    chosen = _choose_classes(regions, all_classes, classes, random_pool)
    pooled = chosen if random_pool == "class" else sorted(regions)
    known = dict(images or {})
    missing = {run: ids - set(known) for run, ids in needed_images(folder, pooled).items() if ids - set(known)}
    known.update(find_study_images(folder, missing, inv_root))
    result = StudyConcepts(_class_ids(known, chosen), {}, {}, {}, {}, {}, {}, [], known, steps,
                           tuple(sorted({int(s) for s in sizes})), seed, random_runs, random_pool)
    result.skipped += [SkippedConcept(c, "", 0, "no cluster of this class has a best label")
                       for c in all_classes if c not in regions and classes is None]
    render = _Renderer(known, to_input, reveal)
    def pool_of(names: Sequence[str]) -> RandomSets:
        return RandomSets(torch.stack(_pool((r for n in names for rs in regions[n].values() for r in rs), render)),
                          seed=seed)

    study_pool = pool_of(pooled) if random_pool == "study" else None  # one pool: CAVs shared by every class
    for name in chosen:
        _build_class(result, name, regions[name], render, study_pool or pool_of([name]))
    if not any(result.concepts.values()):
        reasons = "; ".join(f"{s.class_name}/{s.label or '-'}: {s.reason}" for s in result.skipped[:6])
        raise StudyConceptError(f"no concept can be tested ({reasons}); try smaller --sizes")
    return result



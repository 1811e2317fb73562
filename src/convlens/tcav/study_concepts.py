"""Concept sets for TCAV built from a Deep Reveal study's own labels (the crowd's concepts, Kim et al. 2018's P_C).

A concept (class k, label L) is the set of regions the players named L: each cluster of class k whose best
labels include L gives the INV run's ``input.png`` revealed through its cluster map exactly as the game
revealed it, at the level where those players guessed, normalised like the model's input
(:func:`build_study_concepts` says how, step by step). Masked images, not crops: they are what the players
saw, at the position and scale the model sees, and as concept and random images are made the same way a
CAV can only separate them by what is revealed. Random sets are built the same way from a pool of
labelled regions (``RANDOM_POOLS``): the whole study's (Kim et al.'s random counterexamples), the class's,
or the class's without the concept's own. Regions of *other* classes only are not offered: they carry
those classes' evidence, which pushes class k down, so regions without class-k evidence would come out
"used (+)" (BENCHMARKS.md, "TCAV on a study's own concepts", measures each pool's power and false alarms).
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
RANDOM_POOLS = ("study", "class", "class-others")
CONSTRUCTION = (
    "concept (class k, label L): the clusters of class k whose best labels include L; each gives the INV "
    "run's input.png revealed through the cluster map by Deep Reveal's mask at level ceil(mean level of the "
    "plays that gave L in that cluster), normalised like the model's input; distinct images, sampled (seeded) "
    "to the largest common size the concept fills with a pool at least twice as large. Random sets: the same "
    "construction over every labelled region of the study (random_pool 'study'), of class k ('class'), or of "
    "class k without the clusters labelled L ('class-others'). "
    "Inputs: the study's images of class k."
)


@dataclass(frozen=True)
class SkippedConcept:
    """A label (or a whole class, ``label`` empty) that was not tested, and why."""

    class_name: str
    label: str
    regions: int
    reason: str


@dataclass(kw_only=True)
class StudyConcepts:
    """Everything :class:`~convlens.tcav.runner.TCAVRunner` needs, with the record of how it was built."""

    class_ids: dict[str, int]
    class_inputs: dict[int, torch.Tensor]
    concepts: dict[int, list[ConceptSet]]
    random_sets: dict[int, RandomSets | dict[str, RandomSets]]  # per class one pool, or one per concept
    regions: dict[tuple[str, str], list[Region]]  # the regions behind each tested concept's images, in order
    available: dict[tuple[str, str], int]  # distinct regions each label had before sampling
    pools: dict[str, int]  # regions in each class's pool (class, study pool: what its random sets come from)
    concept_pools: dict[tuple[str, str], int]  # regions in each tested concept's pool
    skipped: list[SkippedConcept]
    images: dict[str, StudyImage]
    percentages: list[float]
    sizes: tuple[int, ...]
    seed: int
    random_runs: int = 20
    random_pool: str = "study"

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
                                 "pool": self.concept_pools.get((name, c.name)),
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
        return f"the random pool has {pool} regions, fewer than 2 x {smallest}"
    return f"the random pool of {pool} regions has too few distinct sets of {smallest} for {random_runs} runs"


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
                 pools: Callable[[str], RandomSets | None]) -> None:
    """The class's tested concepts (sampled to their size), their random pools and the class's inputs."""
    class_id = result.class_ids[name]
    tested: list[ConceptSet] = []
    chosen: dict[str, RandomSets] = {}
    for label in sorted(labels):
        regions, tensors = _distinct(labels[label], render)
        result.available[(name, label)] = len(regions)
        pool = pools(label)
        size_of_pool = 0 if pool is None else int(pool.pool.shape[0])
        size = concept_size(len(regions), size_of_pool, result.sizes, result.random_runs)
        if size is None:
            reason = _size_reason(len(regions), size_of_pool, result.sizes, result.random_runs)
            result.skipped.append(SkippedConcept(name, label, len(regions), reason))
            continue
        assert pool is not None
        rows = np.sort(_label_seed(result.seed, name, label).choice(len(regions), size, replace=False))
        tested.append(ConceptSet(label, torch.stack([tensors[i] for i in rows])))
        result.regions[(name, label)] = [regions[i] for i in rows]
        result.concept_pools[(name, label)] = size_of_pool
        chosen[label] = pool
    if tested:  # only classes with a tested concept enter the run
        result.concepts[class_id] = tested
        shared = {id(pool) for pool in chosen.values()}
        result.random_sets[class_id] = next(iter(chosen.values())) if len(shared) == 1 else chosen
    images = sorted((i for i in result.images.values() if i.explanation.target_name == name), key=lambda i: i.image_id)
    result.class_inputs[class_id] = torch.stack([render.to_input(i.pixels).float() for i in images])


def chosen_classes(folder: LabelsFolder, classes: Sequence[str] | None = None, random_pool: str = "study") -> list[str]:
    """The classes to test (``classes``, default every class with a labelled cluster); StudyConceptError
    for a folder without labels, an unknown class, or a class with a single concept."""
    labels: dict[str, set[str]] = defaultdict(set)
    for row in folder.clusters:
        labels[row["class"]].update(text for text in (row.get("best_labels") or "").split(SEP) if text)
    all_classes = list(labels)
    return _choose_classes({k: v for k, v in labels.items() if v}, all_classes, classes, random_pool)


def _choose_classes(regions: Mapping[str, Collection[str]], all_classes: Sequence[str],
                    classes: Sequence[str] | None, random_pool: str = "study") -> list[str]:
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
        if random_pool != "study" and len(regions[name]) == 1:
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
    random_pool: str = "study",
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
    pooled = chosen if random_pool != "study" else sorted(regions)
    known = dict(images or {})
    missing = {run: ids - set(known) for run, ids in needed_images(folder, pooled).items() if ids - set(known)}
    known.update(find_study_images(folder, missing, inv_root))
    result = StudyConcepts(class_ids=_class_ids(known, chosen), class_inputs={}, concepts={}, random_sets={},
                           regions={}, available={}, pools={}, concept_pools={}, skipped=[], images=known,
                           percentages=steps, sizes=tuple(sorted({int(s) for s in sizes})), seed=seed,
                           random_runs=random_runs, random_pool=random_pool)
    result.skipped += [SkippedConcept(c, "", 0, "no cluster of this class has a best label")
                       for c in all_classes if c not in regions and classes is None]
    render = _Renderer(known, to_input, reveal)

    def pool_of(names: Sequence[str], without: str | None = None) -> RandomSets | None:
        """Distinct labelled regions of the classes ``names``, leaving out the clusters labelled ``without``."""
        own = {r.cluster_id for n in names for r in regions[n].get(without or "", [])}
        tensors = _pool((r for n in names for rs in regions[n].values() for r in rs if r.cluster_id not in own),
                        render)
        return RandomSets(torch.stack(tensors), seed=seed) if len(tensors) >= 2 else None

    study_pool = pool_of(pooled) if random_pool == "study" else None  # one pool: CAVs shared by every class
    for name in chosen:
        class_pool = study_pool or pool_of([name])
        result.pools[name] = 0 if class_pool is None else int(class_pool.pool.shape[0])
        if random_pool == "class-others":
            _build_class(result, name, regions[name], render, lambda label, name=name: pool_of([name], label))
        else:
            _build_class(result, name, regions[name], render, lambda _, pool=class_pool: pool)
    if not any(result.concepts.values()):
        reasons = "; ".join(f"{s.class_name}/{s.label or '-'}: {s.reason}" for s in result.skipped[:6])
        raise StudyConceptError(f"no concept can be tested ({reasons}); try smaller --sizes")
    return result



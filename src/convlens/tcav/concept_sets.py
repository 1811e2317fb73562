"""Concept sets for TCAV: named sets of model-ready images, random counterpart sets, synthetic concepts.

TCAV (Kim et al., ICML 2018) learns a concept activation vector (CAV) from the layer activations of
images that show a concept (the positive set P_C) against images that do not (random sets N). A
:class:`ConceptSet` is one such set: a name and an (N, C, H, W) tensor of images already preprocessed for
the model. Its :attr:`~ConceptSet.digest` hashes the image data (dtype, shape and bytes), so the CAV
cache is keyed by what the concept *is*, not by what it is called: changing one image gives a new digest
and therefore a new CAV.

:class:`RandomSets` draws the random sets of a concept from a pool of images: for a concept of n images,
``runs`` sets of n images (without replacement within a set, independently across sets). The same sets
also form the null: each plays the concept against the others. Set i of size n depends only on
(seed, n, i), so raising ``runs`` from 10 to 20 reuses the first ten sets and their cached CAVs.

:func:`synthetic_concepts` builds the concept sets whose answer is known on the exact-ground-truth
benchmark (:mod:`convlens.data.synthetic`): patches of each class object, patches of a distractor
(shape, texture) pair sharing neither its shape nor its texture, and random patches away from class
objects, each pasted at a random place on the same mid-grey canvas.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from convlens.data.synthetic import CLASS_NAMES, SHAPES, TEXTURES, SyntheticImage, SyntheticShapes

__all__ = [
    "ConceptSet",
    "RandomSets",
    "SyntheticConcepts",
    "synthetic_class_inputs",
    "synthetic_concepts",
    "tensor_digest",
    "unrelated_pair",
]


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (CPU, contiguous): equal digests mean equal data."""
    data = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ConceptSet:
    """A named set of images that illustrate one concept (the positive examples P_C of Kim et al. 2018).

    Args:
        name: human-readable name (a label, ``"circle+hstripes"``, ``"random-3"``); not part of any cache key.
        images: (N, C, H, W) floating-point tensor, already preprocessed for the model, N >= 2.
    """

    name: str
    images: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"concept {self.name!r}: images must be an (N, C, H, W) tensor")
        if not self.images.is_floating_point():
            raise ValueError(f"concept {self.name!r}: images must be preprocessed floats, got {self.images.dtype}")
        if self.images.shape[0] < 2:
            raise ValueError(f"concept {self.name!r}: a CAV needs at least 2 images, got {self.images.shape[0]}")
        if not bool(torch.isfinite(self.images).all()):
            raise ValueError(f"concept {self.name!r}: images contain NaN or infinite values")

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @cached_property
    def digest(self) -> str:
        """Hash of the image data (see :func:`tensor_digest`)."""
        return tensor_digest(self.images)

    @cached_property
    def image_digests(self) -> list[str]:
        """One hash per image: activations are computed once per distinct image."""
        return [tensor_digest(image) for image in self.images]

    @property
    def captum_id(self) -> int:
        """Integer id for :class:`captum.concept.Concept`, derived from the digest (60 bits)."""
        return int(self.digest[:15], 16)

    @classmethod
    def from_pil(
        cls, name: str, images: Sequence[Image.Image], preprocessing: Callable[[Image.Image], torch.Tensor]
    ) -> ConceptSet:
        """Build a set from PIL images and the model's preprocessing (image -> (C, H, W) tensor)."""
        if not images:
            raise ValueError(f"concept {name!r}: no images")
        return cls(name, torch.stack([preprocessing(image) for image in images]))


class RandomSets:
    """Random counterpart sets drawn from a pool of images.

    Args:
        pool: (M, C, H, W) images the random sets are drawn from (e.g. other images' regions).
        seed: base seed; set ``i`` of size ``n`` is drawn from ``numpy.random.default_rng([seed, n, i])``.
    """

    def __init__(self, pool: torch.Tensor, seed: int = 0) -> None:
        if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or pool.shape[0] < 2:
            raise ValueError("the random pool must be an (M, C, H, W) tensor with M >= 2")
        self.pool = pool
        self.seed = seed
        self._sets: dict[tuple[int, int], ConceptSet] = {}

    def draw(self, size: int, index: int) -> ConceptSet:
        """Random set ``index`` (>= 0) of ``size`` images."""
        if index < 0:
            raise ValueError(f"random set index must be >= 0, got {index}")
        if size > self.pool.shape[0]:
            raise ValueError(f"a random set of {size} images needs a pool of at least {size}, got {self.pool.shape[0]}")
        key = (size, index)
        if key not in self._sets:
            rng = np.random.default_rng([self.seed, size, index])
            rows = torch.from_numpy(np.sort(rng.choice(self.pool.shape[0], size, replace=False)))
            self._sets[key] = ConceptSet(f"random-{index}-n{size}", self.pool[rows])
        return self._sets[key]

    def runs(self, size: int, count: int, exclude: Collection[str] = ()) -> list[ConceptSet]:
        """``count`` distinct random sets of ``size`` images: sets 0, 1, 2, ... in order, skipping a set that
        repeats an earlier one or whose digest is in ``exclude`` (e.g. the concept's own: a CAV needs two
        different sets). With a pool much larger than ``size`` nothing is skipped: sets 0 .. count-1."""
        if math.comb(self.pool.shape[0], size) < count + len(exclude):
            raise ValueError(f"a pool of {self.pool.shape[0]} images has fewer than {count} distinct sets of {size} "
                             f"images besides the {len(exclude)} excluded")
        sets: list[ConceptSet] = []
        seen = set(exclude)
        index = 0
        while len(sets) < count:
            if index >= 100 * (count + len(exclude)) + 1000:
                raise ValueError(f"could not draw {count} distinct sets of {size} from a pool of {self.pool.shape[0]}")
            drawn = self.draw(size, index)
            index += 1
            if drawn.digest not in seen:
                seen.add(drawn.digest)
                sets.append(drawn)
        return sets


# --- synthetic benchmark concepts -------------------------------------------------------------------------


@dataclass
class SyntheticConcepts:
    """Concept sets of the exact-ground-truth benchmark, per class.

    ``class_objects[k]``: patches of class k's (shape, texture) object; ``distractors[k]``: patches of the
    off-diagonal pair :func:`unrelated_pair` (k), which shares neither the shape nor the texture of class
    k, with any corner of the image's class object that reaches into the box painted grey; ``random``:
    random patches of an object's size that do not touch a class object. Every patch is pasted at a
    random position on the same mid-grey canvas.
    """

    class_objects: dict[int, ConceptSet]
    distractors: dict[int, ConceptSet]
    random: RandomSets

    def for_class(self, class_id: int) -> list[ConceptSet]:
        return [self.class_objects[class_id], self.distractors[class_id]]


def unrelated_pair(class_id: int) -> tuple[str, str]:
    """(shape, texture) of class ``class_id``'s distractor concept: shape ``k + 1`` and texture ``k + 2``
    (mod 4) — an off-diagonal pair, so it occurs as a distractor in the benchmark's images, and it shares
    neither the shape nor the texture of class k."""
    n = len(SHAPES)
    return SHAPES[(class_id + 1) % n], TEXTURES[(class_id + 2) % n]


def _crop(pixels: np.ndarray, cy: int, cx: int, r: int) -> np.ndarray:
    """Square box of side 2r+3 around an object's centre (covers every shape of radius r)."""
    size = pixels.shape[0]
    top, left = max(0, cy - r - 1), max(0, cx - r - 1)
    return pixels[top : min(size, cy + r + 2), left : min(size, cx + r + 2)]


def _paste(patch: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = np.full((size, size, 3), 128, dtype=np.uint8)
    h, w = patch.shape[:2]
    top, left = (int(v) for v in rng.integers(0, [size - h + 1, size - w + 1]))
    canvas[top : top + h, left : left + w] = patch
    return canvas


def _random_box(item: SyntheticImage, rng: np.random.Generator) -> np.ndarray | None:
    """A box of an object's size (radius 7-10) at a random place that does not touch the class object.

    Leaving class objects out keeps random sets from differing from a distractor concept by
    class-deciding content (a distractor set never holds a class object).
    """
    size = item.pixels.shape[0]
    for _attempt in range(20):
        r = int(rng.integers(7, 11))
        cy, cx = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
        if not _crop(item.mask, cy, cx, r).any():
            return _crop(item.pixels, cy, cx, r)
    return None


def _scan_patches(
    n_images: int, pool_size: int, seed: int, max_images: int
) -> tuple[dict[int, list[np.ndarray]], dict[int, list[np.ndarray]], list[np.ndarray]]:
    """One pass over split ``"val"``: class-object, distractor and random patches until all are full."""
    dataset = SyntheticShapes(size=max_images, seed=seed, split="val")
    rng = np.random.default_rng([seed, 7])
    wanted = {unrelated_pair(k): k for k in range(len(CLASS_NAMES))}
    objects: dict[int, list[np.ndarray]] = {k: [] for k in range(len(CLASS_NAMES))}
    distractors: dict[int, list[np.ndarray]] = {k: [] for k in range(len(CLASS_NAMES))}
    pool: list[np.ndarray] = []
    for index in range(max_images):
        item = dataset.generate(index)
        if len(objects[item.label]) < n_images:
            objects[item.label].append(_paste(_crop(item.pixels, *item.objects[0][2:]), rng, dataset.image_size))
        without_class_object = np.where(item.mask[..., None], np.uint8(128), item.pixels)  # no fragments of it
        for shape, texture, cy, cx, r in item.objects[1:]:
            k = wanted.get((shape, texture))
            if k is not None and len(distractors[k]) < n_images:
                distractors[k].append(_paste(_crop(without_class_object, cy, cx, r), rng, dataset.image_size))
        box = _random_box(item, rng) if len(pool) < pool_size else None
        if box is not None:
            pool.append(_paste(box, rng, dataset.image_size))
        if len(pool) == pool_size and all(len(v) == n_images for v in (*objects.values(), *distractors.values())):
            return objects, distractors, pool
    raise ValueError(f"{max_images} generated images were not enough for {n_images} patches per concept")


def synthetic_concepts(
    preprocessing: Callable[[Image.Image], torch.Tensor],
    n_images: int = 20,
    pool_size: int = 200,
    seed: int = 0,
    max_images: int = 5000,
) -> SyntheticConcepts:
    """Concept sets with a known answer for every class of the synthetic benchmark.

    Patches come from split ``"val"`` (neither the training nor the test images): the class object of
    each image, the distractor pairs :func:`unrelated_pair` wherever they occur, and one random box per
    image (see :func:`_random_box`) for the random pool.
    """
    objects, distractors, pool = _scan_patches(n_images, pool_size, seed, max_images)

    def to_set(name: str, patches: list[np.ndarray]) -> ConceptSet:
        return ConceptSet.from_pil(name, [Image.fromarray(p, "RGB") for p in patches], preprocessing)

    return SyntheticConcepts(
        class_objects={k: to_set(CLASS_NAMES[k], v) for k, v in objects.items()},
        distractors={k: to_set("+".join(unrelated_pair(k)), v) for k, v in distractors.items()},
        random=RandomSets(to_set("random-pool", pool).images, seed=seed),
    )


def synthetic_class_inputs(
    preprocessing: Callable[[Image.Image], torch.Tensor], count: int = 20, seed: int = 0, max_images: int = 5000
) -> dict[int, torch.Tensor]:
    """The first ``count`` test-split images of every class (the inputs X_k whose gradients TCAV tests)."""
    dataset = SyntheticShapes(size=max_images, seed=seed, split="test")
    images: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(CLASS_NAMES))}
    for index in range(max_images):
        item = dataset.generate(index)
        if len(images[item.label]) < count:
            images[item.label].append(preprocessing(Image.fromarray(item.pixels, "RGB")))
        if all(len(v) == count for v in images.values()):
            return {k: torch.stack(v) for k, v in images.items()}
    raise ValueError(f"{max_images} test images hold fewer than {count} images of some class")

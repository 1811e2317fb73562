"""Exact-ground-truth benchmark: the class is decided by one object whose mask is known exactly.

Each image (64 x 64 by default) has a cluttered background (smooth colour noise, random lines and specks)
and several non-overlapping textured objects. Four shapes and four textures give sixteen
(shape, texture) pairs; the four *class* pairs are the diagonal ones (``circle+hstripes``,
``square+vstripes``, ``triangle+checker``, ``cross+dots``). Every image holds exactly one class object;
the 2-4 distractors use the twelve off-diagonal pairs, so each distractor shares its shape with one class
and its texture with another: only the conjunction of shape and texture at one place decides the class,
and a classifier that is right must be looking at the class object. Colours are random per object and
carry no class information. The ground truth is the class object's exact pixel mask.

Image ``i`` of a split is generated from ``numpy.random.default_rng([seed, split_code, i])``: any sample
can be regenerated alone, datasets are reproducible bit for bit, and train/test splits never share a
random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from convlens.data.base import ImageDataset, Sample

__all__ = [
    "CLASS_NAMES",
    "SHAPES",
    "TEXTURES",
    "SyntheticImage",
    "SyntheticShapes",
    "generate_batch",
    "generate_image",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TEXTURES: tuple[str, ...] = ("hstripes", "vstripes", "checker", "dots")
CLASS_NAMES: list[str] = [f"{s}+{t}" for s, t in zip(SHAPES, TEXTURES, strict=True)]
_SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class SyntheticImage:
    """One generated image: (H, W, 3) uint8 pixels, class id, exact (H, W) bool mask of the class object,
    and the (shape, texture, centre_y, centre_x, radius) of every object (class object first)."""

    pixels: np.ndarray
    label: int
    mask: np.ndarray
    objects: list[tuple[str, str, int, int, int]]


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        half = 0.8 * r
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":  # apex up, base at cy + 0.8 r, width 2r at the base
        top, bottom = cy - r, cy + 0.8 * r
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= (yy - top) / (bottom - top) * r)
    if shape == "cross":
        arm = max(1.5, r / 3)
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, yy: np.ndarray, xx: np.ndarray, phase_y: int, phase_x: int) -> np.ndarray:
    y, x = yy + phase_y, xx + phase_x
    if texture == "hstripes":
        return (y // 2) % 2 == 0
    if texture == "vstripes":
        return (x // 2) % 2 == 0
    if texture == "checker":
        return (y // 2 + x // 2) % 2 == 0
    if texture == "dots":
        return (y % 4 < 2) & (x % 4 < 2)
    raise ValueError(f"unknown texture {texture!r}")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours whose mean intensities differ by at least 90 (texture stays visible)."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(a.mean()) - float(b.mean())) >= 90:
            return a.astype(np.float32), b.astype(np.float32)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    coarse = rng.uniform(40, 215, (3, 5, 5)).astype(np.float32)
    # smooth colour noise: bilinear up-sampling of a 5x5 grid per channel
    grid = np.linspace(0, 4, size, dtype=np.float32)
    i0 = np.clip(np.floor(grid).astype(int), 0, 3)
    frac = grid - i0
    rows = coarse[:, i0] * (1 - frac)[None, :, None] + coarse[:, i0 + 1] * frac[None, :, None]
    smooth = rows[:, :, i0] * (1 - frac)[None, None, :] + rows[:, :, i0 + 1] * frac[None, None, :]
    image = np.transpose(smooth, (1, 2, 0)) + rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    for _ in range(int(rng.integers(3, 7))):  # clutter lines
        y0, x0, y1, x1 = rng.uniform(0, size, 4)
        length = max(1.0, float(np.hypot(y1 - y0, x1 - x0)))
        t = np.linspace(0, 1, int(length) * 2)
        ys = np.clip(np.round(y0 + t * (y1 - y0)).astype(int), 0, size - 1)
        xs = np.clip(np.round(x0 + t * (x1 - x0)).astype(int), 0, size - 1)
        image[ys, xs] = rng.integers(0, 256, 3)
    for _ in range(int(rng.integers(4, 10))):  # specks
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 2.5)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = rng.integers(0, 256, 3)
    return image


def generate_image(
    rng: np.random.Generator,
    size: int = 64,
    n_distractors: tuple[int, int] = (2, 4),
    radius: tuple[int, int] = (7, 10),
) -> SyntheticImage:
    """Draw one benchmark image from ``rng`` (see the module docstring for the design)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size, yy, xx)
    label = int(rng.integers(len(CLASS_NAMES)))
    pairs = [(label, label)]
    off_diagonal = [(s, t) for s in range(len(SHAPES)) for t in range(len(TEXTURES)) if s != t]
    for _ in range(int(rng.integers(n_distractors[0], n_distractors[1] + 1))):
        pairs.append(off_diagonal[int(rng.integers(len(off_diagonal)))])
    placed: list[tuple[str, str, int, int, int]] = []
    class_mask = np.zeros((size, size), dtype=bool)
    for k, (s, t) in enumerate(pairs):
        r = int(rng.integers(radius[0], radius[1] + 1))
        for _attempt in range(200):
            cy, cx = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
            if all((cy - py) ** 2 + (cx - px) ** 2 >= (r + pr + 3) ** 2 for _, _, py, px, pr in placed):
                break
        else:
            if k == 0:
                raise RuntimeError("could not place the class object")  # cannot happen on an empty canvas
            continue  # no room for this distractor: leave it out
        shape_mask = _shape_mask(SHAPES[s], yy, xx, cy, cx, r)
        pattern = _texture(TEXTURES[t], yy.astype(int), xx.astype(int), *(int(v) for v in rng.integers(0, 4, 2)))
        fg, bg = _contrasting_colours(rng)
        image[shape_mask] = np.where(pattern[shape_mask][:, None], fg, bg)
        placed.append((SHAPES[s], TEXTURES[t], cy, cx, r))
        if k == 0:
            class_mask = shape_mask
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return SyntheticImage(pixels=pixels, label=label, mask=class_mask, objects=placed)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(_SPLITS)}")
    return np.random.default_rng([seed, _SPLITS[split], index])


def generate_batch(
    start: int, count: int, seed: int = 0, split: str = "train", size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``start .. start+count-1`` of a split: (N, H, W, 3) uint8, (N,) labels, (N, H, W) masks."""
    items = [generate_image(_rng(seed, split, start + i), size) for i in range(count)]
    return (
        np.stack([it.pixels for it in items]),
        np.array([it.label for it in items], dtype=np.int64),
        np.stack([it.mask for it in items]),
    )


class SyntheticShapes(ImageDataset):
    """The exact-ground-truth benchmark as a dataset.

    Args:
        size: number of images.
        seed: generator seed (the committed models were trained on split ``train`` with seed 0 and are
            evaluated on split ``test``).
        split: ``"train"``, ``"val"`` or ``"test"`` (independent random streams).
        image_size: side of the square images.
    """

    def __init__(self, size: int = 200, seed: int = 0, split: str = "test", image_size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        _rng(seed, split, 0)  # validates the split
        self.size = size
        self.seed = seed
        self.split = split
        self.image_size = image_size
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.size

    def sample_ids(self) -> list[str]:
        return [self._id(i) for i in range(self.size)]

    def _id(self, index: int) -> str:
        return f"{self.split}-{self.seed}-{index:06d}"

    @property
    def has_masks(self) -> bool:
        return True

    def generate(self, index: int) -> SyntheticImage:
        return generate_image(_rng(self.seed, self.split, index), self.image_size)

    def load(self, index: int) -> Sample:
        item = self.generate(index)
        return Sample(
            id=self._id(index),
            image=Image.fromarray(item.pixels, "RGB"),
            labels=[item.label],
            masks={item.label: item.mask},
        )

    def describe(self) -> dict[str, object]:
        return super().describe() | {"seed": self.seed, "split": self.split, "image_size": self.image_size}

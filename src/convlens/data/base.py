"""Dataset contract shared by the image folders, VOC/ImageNet XML, COCO and the synthetic benchmark.

A dataset is an indexable list of samples. ``sample_ids()`` is cheap (no decoding) so a resumed run can
skip finished work without opening images; ``load(i)`` decodes one image and its ground truth and raises
:class:`~convlens.models.images.ImageLoadError` (one clear message) for a file that cannot be used, which
the dataset runner records and skips.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from convlens.models.preprocessing import Preprocessing

__all__ = ["ImageDataset", "Sample", "boxes_to_mask", "preprocess_mask"]


@dataclass
class Sample:
    """One image with its ground truth.

    Attributes:
        id: stable identifier (relative path, VOC id, COCO image id, synthetic index).
        image: 8-bit RGB image.
        labels: ground-truth class ids present in the image (empty when unknown).
        masks: class id -> (H, W) boolean ground-truth region at image resolution (object mask, or the
            union of the class's bounding boxes); only for datasets with localisation ground truth.
        boxes: class id -> list of (x_min, y_min, x_max, y_max) boxes in pixels (inclusive corners as
            in the VOC XML files, 1-based there, converted to 0-based here).
        path: source file, when there is one.
    """

    id: str
    image: Image.Image
    labels: list[int] = field(default_factory=list)
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    boxes: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    path: str | None = None


class ImageDataset(abc.ABC):
    """Base of every dataset: ``len``, ``sample_ids``, ``load(i)``, ``class_names`` and ``describe``."""

    class_names: list[str]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def sample_ids(self) -> list[str]:
        """Identifiers of all samples, in order, without decoding any image."""

    @abc.abstractmethod
    def load(self, index: int) -> Sample:
        """Decode sample ``index``; raises ImageLoadError for an unusable image."""

    def describe(self) -> dict[str, Any]:
        """JSON description that identifies the dataset (stored with a run to refuse mismatched resumes)."""
        return {"type": type(self).__name__, "size": len(self), "classes": len(self.class_names)}

    @property
    def has_masks(self) -> bool:
        """Whether samples carry localisation ground truth."""
        return False

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)}")
        return self.load(index % len(self))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.load(i)


def boxes_to_mask(boxes: list[tuple[int, int, int, int]], height: int, width: int) -> np.ndarray:
    """(H, W) boolean union of 0-based inclusive boxes ``(x_min, y_min, x_max, y_max)``, clipped to the image."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(width - 1, int(x1)), min(height - 1, int(y1))
        if x1 >= x0 and y1 >= y0:
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def preprocess_mask(mask: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Apply the geometric part of ``preprocessing`` (short-side resize + centre crop) to a ground-truth mask
    with nearest-neighbour sampling, so that it stays aligned with the model input."""
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L")
    geometry = Preprocessing(
        size=preprocessing.size, resize=preprocessing.resize, interpolation="nearest",
        mean=preprocessing.mean, std=preprocessing.std,
    )
    return np.asarray(geometry.display(image))[..., 0] > 127

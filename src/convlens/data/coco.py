"""MS COCO instances: per-class ground-truth masks from an ``instances_*.json`` via pycocotools.

The ground truth of a class is the union of its instance masks (``COCO.annToMask`` decodes polygons and
RLE alike); the SISE paper's COCO protocol uses the segmentation masks. Category ids are
mapped to contiguous class ids in increasing id order (0..79 for COCO 2014/2017), the order TorchRay's
COCO models use.

pycocotools is an optional dependency: ``pip install "convlens[coco]"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convlens.data.base import ImageDataset, Sample
from convlens.models.images import ImageLoadError, load_image

__all__ = ["COCOInstances", "require_pycocotools"]


def require_pycocotools() -> Any:
    """The ``pycocotools.coco`` module, or one clear error saying how to install it."""
    try:
        from pycocotools import coco
    except ImportError as exc:
        raise ModuleNotFoundError(
            "COCO datasets need pycocotools, which is not installed: pip install 'convlens[coco]' "
            "(or pip install pycocotools)"
        ) from exc
    return coco


class COCOInstances(ImageDataset):
    """COCO images with per-class instance-mask ground truth.

    Args:
        annotation_file: ``instances_val2014.json`` (or any COCO instances file).
        image_dir: folder holding the images named in the file.
        image_ids: restrict to these COCO image ids (default: every image with at least one annotation).
        include_crowd: include ``iscrowd=1`` regions in the masks (default True: they are the class).
        class_names: override the category names (default: the file's, in category-id order).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        image_ids: Sequence[int] | None = None,
        include_crowd: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        coco_module = require_pycocotools()
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = coco_module.COCO(str(self.annotation_file))
        self.category_ids = sorted(self.coco.getCatIds())
        self.class_of_category = {cat: i for i, cat in enumerate(self.category_ids)}
        names = [self.coco.loadCats(cat)[0]["name"] for cat in self.category_ids]
        if class_names is not None:
            if len(class_names) != len(names):
                raise ValueError(f"got {len(class_names)} class names for {len(names)} COCO categories")
            names = list(class_names)
        self.class_names = names
        self.include_crowd = include_crowd
        if image_ids is None:
            self.image_ids = sorted(i for i in self.coco.getImgIds() if self.coco.getAnnIds(imgIds=[i]))
        else:
            unknown = [i for i in image_ids if i not in self.coco.imgs]
            if unknown:
                raise ValueError(f"image ids not in {self.annotation_file.name}: {unknown[:5]}")
            self.image_ids = list(image_ids)
        if not self.image_ids:
            raise ValueError(f"{self.annotation_file} has no annotated images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def sample_ids(self) -> list[str]:
        return [str(i) for i in self.image_ids]

    @property
    def has_masks(self) -> bool:
        return True

    def load(self, index: int) -> Sample:
        image_id = self.image_ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        if (image.height, image.width) != (info["height"], info["width"]):
            raise ImageLoadError(
                f"{path}: image is {image.width}x{image.height}, annotations say {info['width']}x{info['height']}"
            )
        masks: dict[int, np.ndarray] = {}
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])):
            if ann.get("iscrowd", 0) and not self.include_crowd:
                continue
            cls = self.class_of_category[ann["category_id"]]
            instance = self.coco.annToMask(ann).astype(bool)
            masks[cls] = masks[cls] | instance if cls in masks else instance
        return Sample(id=str(image_id), image=image, labels=sorted(masks), masks=masks, path=str(path))

    def describe(self) -> dict[str, object]:
        return super().describe() | {
            "annotations": str(self.annotation_file.resolve()), "images": str(self.image_dir.resolve()),
            "include_crowd": self.include_crowd,
        }

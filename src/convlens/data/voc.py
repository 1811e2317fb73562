"""PASCAL VOC and ImageNet-style XML bounding boxes.

Both use the PASCAL VOC annotation format: one XML file per image with ``<object><name>`` and
``<bndbox><xmin/ymin/xmax/ymax>`` in 1-based inclusive pixel coordinates (converted to 0-based here). The
ground truth of a class is the union of its boxes (the SISE paper's VOC protocol).

* :class:`VOCDetection` — ``VOC2007/{Annotations,JPEGImages,ImageSets/Main/<split>.txt}``, the 20 VOC
  classes in the standard order (TorchRay's and the SISE paper's multi-label models use it).
* :class:`XMLBoxDataset` — an image folder plus an annotation folder with the same file stems (ImageNet
  ``LOC_val`` / ILSVRC ``Annotations/CLS-LOC`` layout), with WordNet ids mapped to class indices by a
  ``LOC_synset_mapping.txt``-style file or a list.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convlens.data.base import ImageDataset, Sample, boxes_to_mask
from convlens.models.images import IMAGE_SUFFIXES, ImageLoadError, load_image

__all__ = [
    "VOC_CLASSES",
    "VOCDetection",
    "VOCObject",
    "XMLBoxDataset",
    "find_voc2007",
    "parse_voc_xml",
    "read_synset_mapping",
]

VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


@dataclass(frozen=True)
class VOCObject:
    """One annotated object: class name, difficult flag and 0-based inclusive box (x0, y0, x1, y1)."""

    name: str
    difficult: bool
    box: tuple[int, int, int, int]


def parse_voc_xml(path: str | Path) -> tuple[str, tuple[int, int] | None, list[VOCObject]]:
    """(file name, (width, height) or None, objects) of a VOC-format annotation file."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not a valid XML annotation ({exc})") from exc
    filename = (root.findtext("filename") or "").strip()
    size = root.find("size")
    dims = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        dims = (int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0)))
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if box is None or not name:
            raise ValueError(f"{path}: an <object> lacks <name> or <bndbox>")
        try:
            x0, y0, x1, y1 = (round(float(box.findtext(tag) or "")) - 1 for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise ValueError(f"{path}: object {name!r} has a missing or non-numeric box coordinate") from exc
        objects.append(VOCObject(name, (obj.findtext("difficult") or "0").strip() == "1", (x0, y0, x1, y1)))
    return filename, dims, objects


def _sample_from_objects(
    sample_id: str, image_path: Path, objects: list[VOCObject], class_index: dict[str, int], include_difficult: bool
) -> Sample:
    image = load_image(image_path)
    boxes: dict[int, list[tuple[int, int, int, int]]] = {}
    for obj in objects:
        if obj.difficult and not include_difficult:
            continue
        if obj.name not in class_index:
            raise ImageLoadError(f"{image_path}: annotation has unknown class {obj.name!r}")
        boxes.setdefault(class_index[obj.name], []).append(obj.box)
    masks = {c: boxes_to_mask(b, image.height, image.width) for c, b in boxes.items()}
    return Sample(id=sample_id, image=image, labels=sorted(boxes), masks=masks, boxes=boxes, path=str(image_path))


def find_voc2007(path: str | Path) -> Path | None:
    """The VOC2007 folder at or under ``path`` (``VOC2007/``, ``VOCdevkit/VOC2007/``), or None."""
    path = Path(path)
    for candidate in (path, path / "VOC2007", path / "VOCdevkit" / "VOC2007"):
        if (candidate / "Annotations").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    return None


class VOCDetection(ImageDataset):
    """PASCAL VOC images with box ground truth (one mask per class present: the union of its boxes).

    Args:
        root: a ``VOC2007``-style folder (or a folder containing ``VOC2007`` or ``VOCdevkit/VOC2007``).
        split: the ``ImageSets/Main/<split>.txt`` list (``test`` for the SISE protocol).
        class_names: class order (default the 20 VOC classes).
        include_difficult: keep objects marked difficult (default True: the SISE paper does not say it
            drops them, and their boxes are still the object).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        class_names: Sequence[str] = VOC_CLASSES,
        include_difficult: bool = True,
    ) -> None:
        found = find_voc2007(root)
        if found is None:
            raise FileNotFoundError(
                f"no PASCAL VOC data at {root}: expected Annotations/ and JPEGImages/ there (or under VOC2007/ "
                "or VOCdevkit/VOC2007/), as extracted from VOCtest_06-Nov-2007.tar"
            )
        self.root = found
        list_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"split list not found: {list_file}")
        self.ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"{list_file} lists no images")
        self.split = split
        self.class_names = list(class_names)
        self.class_index = {name: i for i, name in enumerate(self.class_names)}
        self.include_difficult = include_difficult

    def __len__(self) -> int:
        return len(self.ids)

    def sample_ids(self) -> list[str]:
        return list(self.ids)

    @property
    def has_masks(self) -> bool:
        return True

    def load(self, index: int) -> Sample:
        image_id = self.ids[index]
        annotation = self.root / "Annotations" / f"{image_id}.xml"
        if not annotation.is_file():
            raise ImageLoadError(f"{annotation}: annotation file not found")
        try:
            filename, _, objects = parse_voc_xml(annotation)
        except ValueError as exc:
            raise ImageLoadError(str(exc)) from exc
        image_path = self.root / "JPEGImages" / (filename or f"{image_id}.jpg")
        return _sample_from_objects(image_id, image_path, objects, self.class_index, self.include_difficult)

    def describe(self) -> dict[str, object]:
        return super().describe() | {
            "root": str(self.root.resolve()), "split": self.split, "include_difficult": self.include_difficult,
        }


def read_synset_mapping(path: str | Path) -> list[str]:
    """WordNet ids in class order from a ``LOC_synset_mapping.txt``-style file (``n01440764 tench, ...``)."""
    lines = [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} lists no synsets")
    return lines


class XMLBoxDataset(ImageDataset):
    """Images with VOC-format XML boxes in a parallel folder (ImageNet-style localisation ground truth).

    Args:
        image_dir: the images.
        annotation_dir: ``<stem>.xml`` for each image ``<stem>.<ext>``.
        synsets: class order as object names (e.g. WordNet ids), a list or a ``LOC_synset_mapping.txt``
            file; class names shown are the file's descriptions when given as a file, else the ids.
        include_difficult: keep objects marked difficult.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_dir: str | Path,
        synsets: Sequence[str] | str | Path,
        include_difficult: bool = True,
    ) -> None:
        self.image_dir, self.annotation_dir = Path(image_dir), Path(annotation_dir)
        for folder in (self.image_dir, self.annotation_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder}")
        if isinstance(synsets, str | Path) and Path(synsets).is_file():
            ids = read_synset_mapping(synsets)
            descriptions = [
                line.split(maxsplit=1)[1] if len(line.split(maxsplit=1)) > 1 else line.split()[0]
                for line in Path(synsets).read_text().splitlines() if line.strip()
            ]
        elif isinstance(synsets, str | Path):
            raise FileNotFoundError(f"synset mapping file not found: {synsets}")
        else:
            ids = list(synsets)
            descriptions = list(ids)
        self.class_names = descriptions
        self.class_index = {name: i for i, name in enumerate(ids)}
        self.include_difficult = include_difficult
        self.images = sorted(
            p for p in self.image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.images:
            raise ValueError(f"no images found in {self.image_dir}")

    def __len__(self) -> int:
        return len(self.images)

    def sample_ids(self) -> list[str]:
        return [p.stem for p in self.images]

    @property
    def has_masks(self) -> bool:
        return True

    def load(self, index: int) -> Sample:
        image_path = self.images[index]
        annotation = self.annotation_dir / f"{image_path.stem}.xml"
        if not annotation.is_file():
            raise ImageLoadError(f"{image_path}: no annotation {annotation.name} in {self.annotation_dir}")
        try:
            _, _, objects = parse_voc_xml(annotation)
        except ValueError as exc:
            raise ImageLoadError(str(exc)) from exc
        return _sample_from_objects(image_path.stem, image_path, objects, self.class_index, self.include_difficult)

    def describe(self) -> dict[str, object]:
        return super().describe() | {"images": str(self.image_dir.resolve()), "annotations": str(self.annotation_dir)}

"""Image folders: class from the sub-folder name, from a CSV file, or no labels at all.

* ``root/<class name>/<image>`` — :class:`ImageFolder` (class ids follow the sorted folder names, or the
  order of ``class_names`` when given, e.g. a model's own class list);
* ``root/<image>`` (no sub-folders) — :class:`ImageFolder` without labels (methods explain the predicted
  class);
* a CSV with a ``path`` column and a ``label`` column (class id or class name) — :class:`CSVImageDataset`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from convlens.data.base import ImageDataset, Sample
from convlens.models.images import IMAGE_SUFFIXES, load_image

__all__ = ["CSVImageDataset", "ImageFolder"]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_index(label: str, class_names: Sequence[str], source: str) -> int:
    text = label.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(class_names):
            raise ValueError(f"{source}: class id {index} out of range (0..{len(class_names) - 1})")
        return index
    lowered = [c.lower() for c in class_names]
    if text.lower() not in lowered:
        raise ValueError(f"{source}: unknown class {text!r} (known: {', '.join(class_names[:10])}...)")
    return lowered.index(text.lower())


class ImageFolder(ImageDataset):
    """Images under ``root``: one sub-folder per class, or a flat folder without labels.

    Args:
        root: the folder.
        class_names: names in class-id order (e.g. the model's); sub-folders must be among them. Default:
            the sorted sub-folder names.
        recursive: in a flat folder, also collect images of nested folders (labels stay unknown).
    """

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None, recursive: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        class_dirs = [d for d in subdirs if any(_is_image(f) for f in d.iterdir())]
        self.labelled = bool(class_dirs) and not any(_is_image(f) for f in self.root.iterdir())
        self.items: list[tuple[Path, int | None]] = []
        if self.labelled:
            self.class_names = list(class_names) if class_names else [d.name for d in class_dirs]
            for d in class_dirs:
                label = _class_index(d.name, self.class_names, str(d))
                self.items += [(f, label) for f in sorted(d.iterdir()) if _is_image(f)]
        else:
            self.class_names = list(class_names or [])
            pattern = "**/*" if recursive else "*"
            self.items = [(f, None) for f in sorted(self.root.glob(pattern)) if _is_image(f)]
        if not self.items:
            raise ValueError(f"no images found in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.items)

    def sample_ids(self) -> list[str]:
        return [path.relative_to(self.root).as_posix() for path, _ in self.items]

    def load(self, index: int) -> Sample:
        path, label = self.items[index]
        return Sample(
            id=path.relative_to(self.root).as_posix(), image=load_image(path),
            labels=[] if label is None else [label], path=str(path),
        )

    def describe(self) -> dict[str, object]:
        return super().describe() | {"root": str(self.root.resolve()), "labelled": self.labelled}


class CSVImageDataset(ImageDataset):
    """Images listed in a CSV file with columns ``path`` and ``label`` (header required).

    Args:
        csv_path: the CSV; relative image paths are resolved against ``root`` (default: the CSV's folder).
        class_names: names in class-id order; labels may be ids or names. Default: the sorted distinct
            label names (or ``0..max id`` when all labels are integers).
        path_column / label_column: column names.
    """

    def __init__(
        self,
        csv_path: str | Path,
        root: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        path_column: str = "path",
        label_column: str = "label",
    ) -> None:
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"CSV file not found: {self.csv_path}")
        self.root = Path(root) if root is not None else self.csv_path.parent
        with self.csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if path_column not in columns or label_column not in columns:
                raise ValueError(
                    f"{self.csv_path}: needs columns {path_column!r} and {label_column!r}, found {columns}"
                )
            rows = [(row[path_column], row[label_column]) for row in reader]
        if not rows:
            raise ValueError(f"{self.csv_path} lists no images")
        labels = [label.strip() for _, label in rows]
        if class_names:
            self.class_names = list(class_names)
        elif all(label.lstrip("-").isdigit() for label in labels):
            self.class_names = [str(i) for i in range(max(int(v) for v in labels) + 1)]
        else:
            self.class_names = sorted(set(labels))
        self.items: list[tuple[str, Path, int]] = []
        for line, (relative, label) in enumerate(rows, start=2):
            path = Path(relative)
            self.items.append(
                (relative, path if path.is_absolute() else self.root / path,
                 _class_index(label, self.class_names, f"{self.csv_path}:{line}"))
            )

    def __len__(self) -> int:
        return len(self.items)

    def sample_ids(self) -> list[str]:
        return [relative for relative, _, _ in self.items]

    def load(self, index: int) -> Sample:
        relative, path, label = self.items[index]
        return Sample(id=relative, image=load_image(path), labels=[label], path=str(path))

    def describe(self) -> dict[str, object]:
        return super().describe() | {"csv": str(self.csv_path.resolve())}

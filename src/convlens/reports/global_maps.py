"""Cluster maps for the global report, read from the INV runs a study was built on.

Each merged group of clusters (one image, one layer) is drawn as the weight-averaged map of its member
clusters,  A_G = sum_C w_C A_C / sum_C w_C  (the authors' ``compute_average_heatmap``), smoothed like
the INV explainer (Gaussian sigma 1, truncate 5.5), min-max normalised and laid over the image
(jet, 0.5 opacity). INV folders are read only through INV's file-format module
(:mod:`convlens.inv.manifest`: its overlay smoothing, run lookup and ``load_inv_explanation``);
the image is the folder's ``input.png`` when present. A missing or unreadable INV run gives a note on
the page, never an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convlens.core.overlay import colorize, overlay_map
from convlens.core.overlay import overlay_blur as smooth
from convlens.inv import load_inv_explanation
from convlens.inv.reader import find_run_root, index_inv_folders

__all__ = ["InvLocator", "group_map", "smooth"]

INV_PAGE = "index.html"
INPUT_IMAGE = "input.png"


def group_map(maps: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """``sum_C w_C A_C / sum_C w_C`` (equal weights when they sum to 0)."""
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in maps])
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(maps), 1.0 / len(maps))
    return np.tensordot(w, stacked, axes=1)


@dataclass
class InvLocator:
    """Finds the INV folder of an image in the runs named by a labels folder (cached); problems become notes.

    Runs are found and indexed like ``convlens tcav`` finds them
    (:func:`~convlens.inv.manifest.find_run_root`, :func:`~convlens.inv.manifest.index_inv_folders`).
    """

    runs: dict[str, Path]
    inv_root: Path | None = None
    notes: list[str] = field(default_factory=list)
    _folders: dict[str, dict[str, Path]] = field(default_factory=dict)
    _loaded: dict[Path, object | None] = field(default_factory=dict)

    def _index(self, run: str) -> dict[str, Path]:
        if run not in self._folders:
            root = find_run_root(run, self.runs, self.inv_root)
            if root is None:
                self.notes.append(f"INV run {run!r} not found (looked in {self.runs.get(run, '-')}; pass --inv-root)")
            self._folders[run] = index_inv_folders(root) if root is not None else {}
        return self._folders[run]

    def _explanation(self, folder: Path) -> object | None:
        if folder not in self._loaded:
            try:
                self._loaded[folder] = load_inv_explanation(folder)
            except (OSError, ValueError, KeyError) as exc:
                self.notes.append(f"{folder}: unreadable INV folder ({exc})")
                self._loaded[folder] = None
        return self._loaded[folder]

    def folder(self, run: str, image_id: str) -> Path | None:
        """The INV folder of ``image_id`` in ``run`` (None when not found)."""
        return self._index(run).get(image_id) or self._index(run).get(image_id[:16])

    def page(self, run: str, image_id: str) -> Path | None:
        folder = self.folder(run, image_id)
        return folder / INV_PAGE if folder is not None and (folder / INV_PAGE).is_file() else None

    def cluster_map(self, run: str, image_id: str, cluster_id: str) -> np.ndarray | None:
        folder = self.folder(run, image_id)
        if folder is None:
            return None
        explanation = self._explanation(folder)
        if explanation is None:
            return None
        try:
            cluster = explanation.cluster(cluster_id)  # type: ignore[attr-defined]
        except KeyError:
            self.notes.append(f"cluster {cluster_id} is not in the INV folder {folder}")
            return None
        return None if cluster.input_map is None else np.asarray(cluster.input_map)

    def copy_input(self, run: str, image_id: str, path: Path) -> bool:
        """Copy the image's ``input.png`` from its INV folder to ``path``; False when there is none."""
        folder = self.folder(run, image_id)
        if folder is None or not (folder / INPUT_IMAGE).is_file():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((folder / INPUT_IMAGE).read_bytes())
        return True

    def render(self, run: str, image_id: str, members: list[tuple[str, float]], path: Path) -> bool:
        """Write the group's overlay PNG to ``path``; False (and a note) when a map is missing."""
        maps = [self.cluster_map(run, image_id, cluster_id) for cluster_id, _ in members]
        if not maps or any(m is None for m in maps):
            return False
        saliency = smooth(group_map([m for m in maps if m is not None], [w for _, w in members]))
        folder = self.folder(run, image_id)
        background = folder / INPUT_IMAGE if folder is not None else None
        if background is not None and background.is_file():
            from PIL import Image

            with Image.open(background) as image:
                picture = overlay_map(image.convert("RGB"), saliency)
        else:
            from PIL import Image

            picture = Image.fromarray(colorize(saliency))
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        return True


def relative_link(target: Path, start: Path) -> str:
    """A relative link from the folder ``start`` to ``target`` (for pages moved together)."""
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()

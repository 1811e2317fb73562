"""Reading INV runs back: an explanation folder as :class:`~convlens.inv.results.InvExplanation`, with the
image the model saw, and finding the folders of a run by image id (the study and TCAV read runs this way)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convlens.inv.manifest import MANIFEST, ManifestError, read_manifest
from convlens.inv.results import InvCluster, InvExplanation, InvLayer

__all__ = ["find_run_root", "index_inv_folders", "load_inv_explanation", "load_inv_with_input"]


def load_inv_explanation(directory: str | os.PathLike[str]) -> InvExplanation:
    """Load an :class:`InvExplanation` saved by :meth:`InvExplanation.save` (format versions 1 and 2)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        layers = [_read_layer(entry, directory) for entry in manifest["layers"]]
        return InvExplanation(
            image_id=manifest["image_id"], image_sha256=manifest["image_sha256"], target=manifest["target"],
            target_name=manifest["target_name"], score=manifest["score"], predicted=manifest["predicted"],
            input_size=tuple(manifest["input_size"]), layers=layers, params=manifest["params"],
            timings=manifest["timings"], versions=manifest["versions"], model=manifest["model"],
            layer_choice=manifest.get("layer_choice"),
        )
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{directory / MANIFEST}: missing or malformed field ({exc})") from exc


def load_inv_with_input(directory: str | os.PathLike[str]) -> tuple[InvExplanation, np.ndarray]:
    """An INV result folder's explanation and the image the model saw (``input.png``, RGB uint8 (H, W, 3)).

    Raises :class:`ManifestError` (a ValueError) with the folder's name when either cannot be read."""
    from PIL import Image

    folder = Path(directory)
    try:
        explanation = load_inv_explanation(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"{folder}: unreadable INV result ({exc})") from exc
    path = folder / "input.png"
    if not path.is_file():
        raise ManifestError(f"{folder}: no input.png (the image the model saw; run `convlens explain` with it)")
    try:
        with Image.open(path) as image:
            return explanation, np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # cut, corrupt or not a PNG
        raise ManifestError(f"{path}: unreadable image ({exc}); rerun `convlens explain` for this image") from None


def _read_layer(entry: dict[str, Any], directory: Path) -> InvLayer:
    files = entry["files"]
    clusters = [
        InvCluster(
            c["index"], c["channels"], c["weight"], _array(directory, c["files"], "feature_map"),
            _array(directory, c["files"], "input_map"), c["id"],
        )
        for c in entry["clusters"]
    ]
    weak = [InvCluster(c["index"], c["channels"], c["weight"]) for c in entry["weak_clusters"]]
    return InvLayer(
        index=entry["index"], name=entry["name"], conv=entry["conv"], num_channels=entry["channels"],
        feature_size=tuple(entry["feature_size"]), alpha=_array(directory, files, "alpha"),
        weights=_array(directory, files, "weights"), prune_threshold=entry["prune_threshold"],
        kept_channels=_array(directory, files, "kept"), labels=_array(directory, files, "labels"),
        embedding=_array(directory, files, "embedding"), n_clusters=entry["n_clusters"],
        silhouettes={int(k): v for k, v in entry["silhouettes"].items()}, pca_components=entry["pca_components"],
        perplexity=entry["perplexity"], weak_threshold=entry["weak_threshold"], clusters=clusters,
        weak_clusters=weak, layer_map=_array(directory, files, "layer_map"), fallback=entry["fallback"],
        timings=entry["timings"], conv_position=entry.get("conv_position"),
    )


def _array(directory: Path, files: dict[str, str], key: str) -> Any:
    """The array ``files[key]`` (None if absent); a path leaving ``directory`` is refused."""
    if key not in files:
        return None
    root = directory.resolve()
    path = (root / files[key]).resolve()
    if not path.is_relative_to(root):
        raise ManifestError(f"{directory / MANIFEST}: file {files[key]!r} is outside the folder")
    return np.load(path, allow_pickle=False)


def find_run_root(run: str, recorded: Mapping[str, Any], inv_root: Path | None = None) -> Path | None:
    """The folder of the INV run named ``run``: ``inv_root/run``, then ``inv_root`` itself (when given),
    then the path ``recorded[run]`` (a labels folder's ``inv_runs``); the first that is a folder, else None."""
    candidates = [inv_root / run, inv_root] if inv_root is not None else []
    if run in recorded:
        candidates.append(Path(recorded[run]))
    return next((c for c in candidates if c.is_dir()), None)


def index_inv_folders(root: Path) -> dict[str, Path]:
    """Image id (full and its 16-digit prefix) -> INV folder, for every ``inv.json`` under ``root`` (first
    found wins, in sorted path order); folders whose manifest cannot be read are left out."""
    found: dict[str, Path] = {}
    for manifest in sorted(root.rglob(MANIFEST)):
        try:
            image_id = str(read_manifest(manifest.parent)["image_id"])
        except (OSError, ValueError, KeyError):
            continue
        found.setdefault(image_id, manifest.parent)
        found.setdefault(image_id[:16], manifest.parent)
    return found

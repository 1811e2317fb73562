"""INV's file format: ``inv.json`` and its arrays — the contract the Deep Reveal study server reads.

A folder written by :func:`save_inv_explanation` (``InvExplanation.save``) holds ``inv.json``, optional
``input.png`` and one sub-folder per explained layer. Every path in the manifest is relative to the
folder. Readers must check ``format`` and ``format_version``; fields may be *added* within a version,
never removed or changed in meaning (that takes a new version).

Schema, ``format_version`` 2 (UTF-8 JSON object)::

    format          "convlens-inv"
    format_version  2
    image_id        first 16 hex digits of image_sha256: the prefix of every cluster id
    image_sha256    SHA-256 hex digest of the image file's bytes (command line) or of its pixels or
                    tensor values (API; see image_digest)
    model           model name or null
    target, target_name, score, predicted    explained class id, its name or null, its score
                    (params.score: "logit" by default), predicted class id
    input_size      [H, W] of the model input
    params          INV parameters (INVParams fields) plus "score" and "layers"
    layer_choice    how the layers were chosen (new in 2):
                    {"rule": "tail" | "depth" | "convs" | "explicit", "num_layers": int,
                     "conv_layers": number of conv layers found, "spec": [names] for "explicit"}
    versions        {"convlens", "torch", "numpy", "scikit-learn", "python"}
    timings         seconds per step
    files           {"input": "input.png"} when saved with an image
    layers          list, forward order (low -> high), each:
        index                0-based position in this list
        name, conv           hooked module and the nn.Conv2d it belongs to
        conv_position        position among the network's conv layers, forward order, or null (new in 2)
        dir                  "L<index:02d>_<name>" sub-folder
        channels             K; feature_size [h, w]
        prune_threshold      d(K) in percent; kept_count: maps with weight > d(K)
        n_clusters           k chosen by the silhouette (before weak removal); silhouettes {"k": value}
        pca_components, perplexity (null for the PCA embedding), weak_threshold (percent), fallback (text or null)
        timings              seconds per step
        files                {"weights", "alpha", "kept", "labels", "layer_map", "embedding"?, "layer_overlay"?}:
                             .npy arrays (K,), (K,), (n_kept,), (n_kept,), (H, W), (n_kept, 2); a PNG overlay
        clusters             kept clusters, heaviest first, each:
            id               "<image_id>:<layer name>:<index>" (stable: what labels refer to)
            layer, index     layer name; rank by weight in the layer (0 = heaviest)
            channels         member channel indices; map_count = len(channels)
            weight           percent of the whole layer; average_weight = weight / map_count
            files            {"feature_map": (h, w) .npy, "input_map": (H, W) .npy, "overlay"?: PNG}
        weak_clusters        removed clusters: as clusters, with "id": null and no files

Version 1 (convlens 0.1.0) is version 2 without ``layer_choice`` and ``conv_position``; it is read too.
A manifest of a *later* version is refused with a message saying to upgrade convlens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.core.files import atomic_directory
from convlens.core.overlay import overlay_blur

if TYPE_CHECKING:
    from convlens.inv.results import InvCluster, InvExplanation, InvLayer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "READABLE_VERSIONS",
    "ManifestError",
    "image_digest",
    "read_manifest",
    "save_inv_explanation",
]

FORMAT = "convlens-inv"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "inv.json"


class ManifestError(ValueError):
    """A folder or ``inv.json`` that is not a readable INV manifest (the message says why)."""


# ------------------------------------------------------------------------------------------------ write
def save_inv_explanation(explanation: InvExplanation, directory: str | os.PathLike[str], image: Any = None) -> Path:
    """Write ``explanation`` into ``directory`` atomically; returns the manifest path.

    An existing ``directory`` is replaced only if it is an INV folder (or empty): anything else raises
    FileExistsError and is left as it was. Files: ``inv.json``, per layer ``weights.npy`` (percent),
    ``alpha.npy``, ``kept.npy``, ``labels.npy``, ``embedding.npy``, ``layer_map.npy`` and per kept cluster
    ``cC_feature.npy`` (h, w), ``cC_input.npy`` (H, W); with ``image`` (PIL or (H, W, 3) uint8) also the
    overlays ``cC.png`` and ``layer_map.png`` (Gaussian blur sigma 1, truncate 5.5, jet, alpha 0.5 — the
    INV authors' explainer overlays) and ``input.png``.
    """
    display = _display_image(image, explanation.input_size) if image is not None else None
    with atomic_directory(directory, replaceable=_is_inv_folder) as tmp:
        manifest = _manifest_of(explanation)
        if display is not None:
            display.save(tmp / "input.png")
            manifest["files"] = {"input": "input.png"}
        for layer, entry in zip(explanation.layers, manifest["layers"], strict=True):
            _save_layer(layer, entry, tmp, display)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(directory) / MANIFEST


def _save_layer(layer: InvLayer, entry: dict[str, Any], folder: Path, display: Any) -> None:
    from convlens.core.overlay import overlay_map

    sub = folder / entry["dir"]
    sub.mkdir()
    arrays = {
        "weights": layer.weights, "alpha": layer.alpha, "kept": layer.kept_channels,
        "labels": layer.labels, "layer_map": layer.layer_map,
    }
    if layer.embedding is not None:
        arrays["embedding"] = layer.embedding
    for key, value in arrays.items():
        np.save(sub / f"{key}.npy", np.asarray(value))
        entry["files"][key] = f"{entry['dir']}/{key}.npy"
    if display is not None:
        overlay_map(display, overlay_blur(layer.layer_map)).save(sub / "layer_map.png")
        entry["files"]["layer_overlay"] = f"{entry['dir']}/layer_map.png"
    for cluster, cluster_entry in zip(layer.clusters, entry["clusters"], strict=True):
        assert cluster.feature_map is not None and cluster.input_map is not None
        stem = f"c{cluster.index}"
        np.save(sub / f"{stem}_feature.npy", cluster.feature_map.astype(np.float32))
        np.save(sub / f"{stem}_input.npy", cluster.input_map.astype(np.float32))
        cluster_entry["files"] = {
            "feature_map": f"{entry['dir']}/{stem}_feature.npy", "input_map": f"{entry['dir']}/{stem}_input.npy",
        }
        if display is not None:
            overlay_map(display, overlay_blur(cluster.input_map)).save(sub / f"{stem}.png")
            cluster_entry["files"]["overlay"] = f"{entry['dir']}/{stem}.png"


def _manifest_of(explanation: InvExplanation) -> dict[str, Any]:
    """The manifest (without file entries, which :func:`save_inv_explanation` adds) of ``explanation``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "image_id": explanation.image_id,
        "image_sha256": explanation.image_sha256,
        "model": explanation.model,
        "target": explanation.target,
        "target_name": explanation.target_name,
        "score": explanation.score,
        "predicted": explanation.predicted,
        "input_size": list(explanation.input_size),
        "params": explanation.params,
        "layer_choice": explanation.layer_choice,
        "versions": explanation.versions,
        "timings": explanation.timings,
        "layers": [_layer_entry(layer) for layer in explanation.layers],
    }


def _layer_entry(layer: InvLayer) -> dict[str, Any]:
    return {
        "index": layer.index,
        "name": layer.name,
        "conv": layer.conv,
        "conv_position": layer.conv_position,
        "dir": f"L{layer.index:02d}_{_safe_name(layer.name)}",
        "channels": layer.num_channels,
        "feature_size": list(layer.feature_size),
        "prune_threshold": layer.prune_threshold,
        "kept_count": len(layer.kept_channels),
        "n_clusters": layer.n_clusters,
        "silhouettes": {str(k): v for k, v in layer.silhouettes.items()},
        "pca_components": layer.pca_components,
        "perplexity": layer.perplexity,
        "weak_threshold": layer.weak_threshold,
        "fallback": layer.fallback,
        "timings": layer.timings,
        "files": {},
        "clusters": [_cluster_entry(c, layer) for c in layer.clusters],
        "weak_clusters": [_cluster_entry(c, layer) for c in layer.weak_clusters],
    }


def _cluster_entry(cluster: InvCluster, layer: InvLayer) -> dict[str, Any]:
    return {
        "id": cluster.id or None,
        "layer": layer.name,
        "index": cluster.index,
        "channels": [int(c) for c in cluster.channels],
        "weight": cluster.weight,
        "average_weight": cluster.average_weight,
        "map_count": cluster.map_count,
    }


# ------------------------------------------------------------------------------------------------- read
def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``inv.json`` of ``directory`` (format and a readable version), as a dict.

    Raises FileNotFoundError (no manifest) or :class:`ManifestError` (not INV's, unreadable, or written
    by a later convlens).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no INV manifest (expected a folder written by InvExplanation.save)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a convlens INV manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: invalid format_version {version!r}")
    if version not in READABLE_VERSIONS:
        newest = max(READABLE_VERSIONS)
        raise ManifestError(
            f"{path} has INV format version {version}, written by a newer convlens; this convlens reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))} (newest {newest}): upgrade convlens to read it"
        )
    return manifest


def _is_inv_folder(path: Path) -> bool:
    """True if ``path`` is an empty folder or one holding a convlens INV manifest (so it may be replaced)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        read_manifest(path)
    except (OSError, ValueError):
        return False
    return True



# ----------------------------------------------------------------------------------------------- images
def image_digest(image: Any) -> str:
    """SHA-256 hex digest identifying an image: of the file bytes (path or bytes), of the RGB pixels
    (PIL image / uint8 array, shape included) or of the float32 tensor values (shape included)."""
    sha = hashlib.sha256()
    if isinstance(image, str | os.PathLike):
        sha.update(Path(image).read_bytes())
    elif isinstance(image, bytes | bytearray):
        sha.update(bytes(image))
    elif type(image).__module__.startswith("torch"):  # a tensor (torch is not imported for the check)
        values = image.detach().float().cpu().contiguous()
        sha.update(str(tuple(values.shape)).encode())
        sha.update(values.numpy().tobytes())
    else:
        from PIL import Image

        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        sha.update(str(array.shape).encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "layer"


def _display_image(image: Any, size: tuple[int, int]) -> Any:
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image must be a PIL image or an (H, W, 3) uint8 array, got shape {array.shape}")
        image = Image.fromarray(array.astype(np.uint8))
    image = image.convert("RGB")
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)

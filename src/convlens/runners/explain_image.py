"""The work on one image of a ``convlens explain`` run: explain it with every explainer, write its files.

:func:`explain_image` is a function of (image path, loaded model, explainers, settings) and a fresh
folder to write into; it returns the image's record. It knows nothing of the output folder, resume or
the report (:mod:`convlens.runners.explain_store`), so an engine that spreads images over workers can
call it as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convlens.core.maps import minmax_normalize
from convlens.core.overlay import overlay_map
from convlens.inv.explainer import INV
from convlens.inv.report import render_inv_page
from convlens.models import LoadedModel
from convlens.models.images import load_image

__all__ = ["IMAGE_FORMAT", "IMAGE_RECORD", "ImageSettings", "explain_image", "file_digest"]

IMAGE_RECORD = "result.json"
IMAGE_FORMAT = "convlens-explain-image"


@dataclass(frozen=True)
class ImageSettings:
    """What every image of a run shares: the explained class (None = predicted) and the settings hash."""

    target: int | None
    config_hash: str


def file_digest(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def explain_image(
    path: Path, loaded: LoadedModel, explainers: Mapping[str, Any], settings: ImageSettings, directory: Path
) -> dict[str, Any]:
    """Explain the image at ``path`` into the empty folder ``directory``; return its record (also written
    there as ``result.json``). Raises :class:`~convlens.models.ImageLoadError` for an unusable image."""
    image = load_image(path)
    digest = file_digest(path)
    display = loaded.preprocessing.display(image)
    device = next(loaded.module.parameters()).device
    x = loaded.preprocessing(image)[None].to(device)
    display.save(directory / "input.png")
    with torch.inference_mode():
        logits = loaded.module.eval()(x)[0]
    results = []
    for name, explainer in explainers.items():
        if isinstance(explainer, INV):
            results.append(_inv_result(explainer, path, digest, display, x, directory, settings.target, loaded))
        else:
            results.append(_saliency_result(name, explainer, display, x, directory, settings.target, loaded))
    record = {
        "format": IMAGE_FORMAT,
        "format_version": 1,
        "image": str(path),
        "source": str(path.resolve()),
        "sha256": digest,
        "top5": _top5(logits, loaded.class_names),
        "results": results,
        "config_hash": settings.config_hash,
        "written": [*sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")), IMAGE_RECORD],
    }
    (directory / IMAGE_RECORD).write_text(json.dumps(record, indent=2))
    return record


def _saliency_result(
    name: str, explainer: Any, display: Any, x: torch.Tensor, directory: Path, target: int | None,
    loaded: LoadedModel,
) -> dict[str, Any]:
    explanation = explainer.explain(x, targets=target)
    files = explanation.save(directory, image=display, class_names=loaded.class_names, stem=name)
    record = explanation.summary(0, loaded.class_names) | {"files": files}
    record["block_images"] = _save_blocks(explanation, display, directory, name) if explanation.layer_maps else []
    return record


def _save_blocks(explanation: Any, display: Any, directory: Path, method: str) -> list[dict[str, str]]:
    blocks = []
    for i, (name, layer_map) in enumerate(explanation.layer_maps.items()):
        file = f"{method}_block{i}.png"
        normalized = minmax_normalize(layer_map[0].float()).cpu().numpy()
        overlay_map(display, normalized).save(directory / file)
        blocks.append({"name": name, "file": file})
    return blocks


def _inv_result(
    inv: INV, path: Path, digest: str, display: Any, x: torch.Tensor, directory: Path, target: int | None,
    loaded: LoadedModel,
) -> dict[str, Any]:
    """INV into ``directory/inv`` (manifest, arrays, overlays, its layer-by-layer page); the record shows the
    deepest layer's heaviest cluster and links the page. Cluster ids start with the image *file*'s hash."""
    explanation = inv.explain(x, target=target, image_id=digest)
    sub = directory / inv.name
    explanation.save(sub, image=display)
    render_inv_page(sub, title=f"{path.name} — INV layer by layer", class_names=loaded.class_names)
    manifest = json.loads((sub / "inv.json").read_text())
    with_clusters = [layer for layer in manifest["layers"] if layer["clusters"]]
    overlay = (  # the deepest layer's heaviest cluster; no cluster anywhere: the deepest layer's Grad-CAM
        f"inv/{with_clusters[-1]['clusters'][0]['files']['overlay']}" if with_clusters
        else f"inv/{manifest['layers'][-1]['files']['layer_overlay']}"
    )
    extras = {
        layer.name: f"{len(layer.clusters)} clusters ({layer.n_clusters} before weak removal), "
        f"{len(layer.kept_channels)}/{layer.num_channels} maps kept" + (f"; {layer.fallback}" if layer.fallback else "")
        for layer in explanation.layers
    }
    return {
        "method": inv.name,
        "target": explanation.target,
        "target_name": explanation.target_name,
        "score": explanation.score,
        "params": explanation.params,
        "layers": [layer.name for layer in explanation.layers],
        "layer_choice": explanation.layer_choice,
        "timings": {k: round(float(v), 6) for k, v in explanation.timings.items()},
        "forward_passes": 1,
        "backward_passes": 1,
        "files": {"overlay": overlay, "json": "inv/inv.json"},
        "page": "inv/index.html",
        "image_id": explanation.image_id,
        "extras": extras,
        "block_images": [
            {"name": layer["name"], "file": f"inv/{layer['files']['layer_overlay']}"} for layer in manifest["layers"]
        ],
        "block_note": "each layer's Grad-CAM; the clusters are on the layer-by-layer page",
    }


def _top5(logits: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(5, probs.numel()))
    return [
        {"id": int(i), "name": class_names[int(i)] if int(i) < len(class_names) else str(int(i)), "prob": float(v)}
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]

"""The INV explainer page: the network walked layer by layer, each layer's cluster maps sorted by weight.

A generated version of the page the INV authors published (``explainer.html``): for every explained
layer (low -> high) the layer's Grad-CAM, then its cluster overlays with weight %, number of feature
maps and average weight per map, heaviest first; weak (removed) clusters are listed. Rendered with
Jinja2 (``concepts/templates/inv.html``) and autoescaping from a directory written by
:meth:`InvExplanation.save`, so every string that comes from the user (layer names, class names, the
title) is escaped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from convlens.core.files import atomic_write_text
from convlens.inv.manifest import MANIFEST, read_manifest
from convlens.inv.results import InvExplanation

__all__ = ["render_inv_page", "save_with_page"]

PAGE_NAME = "index.html"


def _environment() -> Environment:
    return Environment(loader=PackageLoader("convlens.inv", "templates"), autoescape=select_autoescape(["html"]))


def render_inv_page(
    directory: str | os.PathLike[str],
    title: str | None = None,
    class_names: list[str] | None = None,
    page_name: str = PAGE_NAME,
) -> Path:
    """Render the layer-by-layer page into ``directory`` (written by :meth:`InvExplanation.save`).

    The page references the overlays saved there (relative links); layers appear in forward order,
    clusters by decreasing weight. Returns the page path (written atomically).
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory / MANIFEST}: save the explanation with InvExplanation.save first")
    manifest: dict[str, Any] = read_manifest(directory)
    layers = []
    for layer in manifest["layers"]:
        silhouettes = layer.get("silhouettes") or {}
        best = silhouettes.get(str(layer["n_clusters"]))
        layers.append(layer | {
            "best_silhouette": best,
            "clusters": sorted(layer["clusters"], key=lambda c: -c["weight"]),
            "weak_clusters": sorted(layer["weak_clusters"], key=lambda c: -c["weight"]),
        })
    predicted = manifest["predicted"]
    predicted_name = class_names[predicted] if class_names and predicted < len(class_names) else str(predicted)
    if manifest["predicted"] == manifest["target"] and manifest.get("target_name"):
        predicted_name = manifest["target_name"]
    steps = [(k, v) for k, v in manifest["timings"].items() if k not in ("total", "layers_wall")]
    html = _environment().get_template("inv.html").render(
        title=title or f"INV — {manifest.get('target_name') or manifest['target']}",
        m=manifest,
        layers=layers,
        input=(manifest.get("files") or {}).get("input"),
        predicted_name=predicted_name,
        steps=steps,
    )
    page = directory / page_name
    atomic_write_text(page, html)
    return page


def save_with_page(
    explanation: InvExplanation, directory: str | os.PathLike[str], image: Any, title: str | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Save ``explanation`` with overlays of ``image`` and render its page; returns the page path."""
    explanation.save(directory, image=image)
    return render_inv_page(directory, title=title, class_names=class_names)

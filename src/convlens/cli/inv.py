"""``convlens explain IMAGE --method inv``: INV's layer-by-layer page for each image.

INV is not a registry method (its result is per-layer clusters, not one saliency map; see
:mod:`convlens.concepts`), so ``convlens explain`` takes ``inv`` out of the method list with
:func:`split_inv_request`, builds the explainer with :func:`build_inv` and, for every image, calls
:func:`explain_inv`, which writes ``<image dir>/inv/`` (manifest, arrays, overlays, ``index.html``) and
returns a record that the index page shows like any method's, with a link to the layer-by-layer page.

Options: ``--param inv.KEY=VALUE`` (e.g. ``inv.embedding=opentsne``, ``inv.num_layers=5``,
``inv.weighting=gradcam``); when ``inv`` is the only method, unscoped ``--param KEY=VALUE`` work too.
``--layers`` chooses the explained layers (default: the last nine convolutional layers).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from convlens.cli.common import CliError, parse_literal
from convlens.concepts.inv import INV
from convlens.concepts.inv_report import render_inv_page

__all__ = ["INV_METHOD", "build_inv", "explain_inv", "inv_options", "split_inv_request"]

INV_METHOD = "inv"
_NOT_OPTIONS = {"self", "model", "layers", "output_adapter", "class_names"}


def inv_options() -> list[str]:
    """Keyword arguments of :class:`~convlens.concepts.INV` settable with ``--param``."""
    return [p for p in inspect.signature(INV.__init__).parameters if p not in _NOT_OPTIONS]


def split_inv_request(
    methods: Sequence[str], params: Sequence[str]
) -> tuple[list[str], list[str], dict[str, Any] | None]:
    """Separate INV from the other methods.

    Returns ``(other methods, other --param items, INV keyword arguments or None if INV was not asked
    for)``. ``inv.KEY=VALUE`` items go to INV; unscoped items too when INV is the only method.
    """
    wanted = any(m.strip().lower() == INV_METHOD for m in methods)
    others = [m for m in methods if m.strip().lower() != INV_METHOD]
    if not wanted:
        return others, list(params), None
    options = inv_options()
    kwargs: dict[str, Any] = {}
    rest: list[str] = []
    for item in params:
        key, sep, value = item.partition("=")
        scope, _, name = key.strip().rpartition(".")
        if not sep or not (scope == INV_METHOD or (not scope and not others)):
            rest.append(item)
            continue
        if name not in options:
            raise CliError(f"--param {item!r}: INV has no option {name!r}; options: {', '.join(options)}")
        kwargs[name] = parse_literal(value)
    return others, rest, kwargs


def build_inv(loaded: Any, kwargs: dict[str, Any], layers: str | None = None) -> INV:
    """The INV explainer for ``loaded`` (a LoadedModel), validated before any image is processed."""
    layer_spec: Any = None
    if layers:
        parts = [p.strip() for p in layers.split(",") if p.strip()]
        layer_spec = parts[0] if len(parts) == 1 else parts
    size = loaded.preprocessing.size
    try:
        inv = INV(loaded, layers=layer_spec, **kwargs)
        inv.layers_for((3, size, size))
    except (TypeError, ValueError) as exc:
        raise CliError(f"inv: {exc}") from exc
    return inv


def explain_inv(
    inv: INV,
    path: Path,
    display: Any,
    x: torch.Tensor,
    directory: Path,
    target: int | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Explain one image with INV into ``directory / "inv"``; return the record for the index page.

    ``display`` is the RGB image the model sees (overlays); ``x`` its (1, C, H, W) model input. Cluster
    ids start with the first 16 hex digits of the SHA-256 of the image *file*.
    """
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    explanation = inv.explain(x, target=target, image_id=digest)
    sub = Path(directory) / INV_METHOD
    explanation.save(sub, image=display)
    render_inv_page(sub, title=f"{Path(path).name} — INV layer by layer", class_names=class_names)
    manifest = json.loads((sub / "inv.json").read_text())
    overlay = None
    for layer in reversed(manifest["layers"]):
        if layer["clusters"]:
            overlay = f"{INV_METHOD}/{layer['clusters'][0]['files']['overlay']}"
            break
    if overlay is None:  # no layer kept a cluster: show the deepest layer's Grad-CAM
        overlay = f"{INV_METHOD}/{manifest['layers'][-1]['files']['layer_overlay']}"
    extras = {
        layer.name: f"{len(layer.clusters)} clusters ({layer.n_clusters} before weak removal), "
        f"{len(layer.kept_channels)}/{layer.num_channels} maps kept"
        + (f"; {layer.fallback}" if layer.fallback else "")
        for layer in explanation.layers
    }
    return {
        "method": INV_METHOD,
        "target": explanation.target,
        "target_name": explanation.target_name,
        "score": explanation.score,
        "params": explanation.params,
        "layers": [layer.name for layer in explanation.layers],
        "timings": {k: round(float(v), 6) for k, v in explanation.timings.items()},
        "forward_passes": 1,
        "backward_passes": 1,
        "files": {"overlay": overlay, "json": f"{INV_METHOD}/inv.json"},
        "page": f"{INV_METHOD}/index.html",
        "image_id": explanation.image_id,
        "extras": extras,
        "block_images": [
            {"name": layer["name"], "file": f"{INV_METHOD}/{layer['files']['layer_overlay']}"}
            for layer in manifest["layers"]
        ],
        "block_note": "each layer's Grad-CAM; the clusters are on the layer-by-layer page",
    }

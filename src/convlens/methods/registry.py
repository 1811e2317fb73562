"""Method registry: one line per method, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

from convlens.methods.base import Explainer

__all__ = ["LAYER_EXPLAINERS", "METHODS", "available_methods", "create", "get_method"]

# name -> "module:Class"  (a new method is one file, one line here, one test module)
METHODS: dict[str, str] = {
    "gradcam": "convlens.methods.gradcam:GradCAM",
    "gradcampp": "convlens.methods.gradcampp:GradCAMpp",
    "layercam": "convlens.methods.layercam:LayerCAM",
    "scorecam": "convlens.methods.scorecam:ScoreCAM",
    "rise": "convlens.methods.rise:RISE",
    "ig": "convlens.methods.ig:IntegratedGradients",
    "advise": "convlens.methods.advise:ADVISE",
    "sise": "convlens.methods.sise:SISE",
    "adasise": "convlens.methods.adasise:AdaSISE",
}


# Explainers of another kind that ``convlens explain --methods`` also runs: name -> how to make one in Python.
# Not saliency methods (INV gives per layer clusters of feature maps, not one map per image), so ``create``
# does not return them: it names the right constructor instead.
LAYER_EXPLAINERS: dict[str, str] = {"inv": "convlens.INV(model)"}


def available_methods() -> list[str]:
    """The saliency methods ``create`` makes (the layer explainers are in :data:`LAYER_EXPLAINERS`)."""
    return list(METHODS)


def get_method(name: str) -> type[Explainer]:
    """The class registered as ``name``."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {k.replace("_", ""): k for k in METHODS} | {"gradcam++": "gradcampp", "integratedgradients": "ig"}
    if key in LAYER_EXPLAINERS:
        raise ValueError(f"{name!r} is a layer explainer, not a saliency method (per layer, clusters of feature "
                         f"maps, not one map per image): use {LAYER_EXPLAINERS[key]}")
    if key not in aliases:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    module_name, class_name = METHODS[aliases[key]].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create(name: str, model: Any, **kwargs: Any) -> Explainer:
    """Instantiate saliency method ``name`` on ``model`` (ValueError for an unknown name or a layer explainer)."""
    return get_method(name)(model, **kwargs)

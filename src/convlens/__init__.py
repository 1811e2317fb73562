"""convlens — explain CNN image classifiers: where they look, what each layer sees, what people call it.

The names a user needs first are available here, imported on first use (``import convlens`` stays cheap:
no torch until one of them is touched)::

    import convlens

    model = convlens.load("efficientnet_lite0")
    x = model.preprocessing(convlens.load_image("cat.jpg"))[None]
    explanation = convlens.create("gradcam", model).explain(x)
    layers = convlens.INV(model, layers="depth").explain(x)

Everything else lives in the subpackages: ``convlens.models`` (zoo, preprocessing, images),
``convlens.methods`` (saliency methods and their registry), ``convlens.inv`` (what each layer sees),
``convlens.labels`` (players' words -> concept labels, trends), ``convlens.tcav`` (does the model use them?),
``convlens.study`` (the Deep Reveal study server), ``convlens.crowd`` (a simulated crowd),
``convlens.metrics``, ``convlens.data``, ``convlens.runners`` (explain / evaluate many images),
``convlens.core`` (hooks, layers, targets, the Explanation result, typed parameters).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (imported lazily by __getattr__)
_EXPORTS = {
    "load": "convlens.models",
    "load_image": "convlens.models",
    "wrap": "convlens.models",
    "create": "convlens.methods",
    "available_methods": "convlens.methods",
    "Explanation": "convlens.core.explanation",
    "INV": "convlens.inv",
    "load_inv_explanation": "convlens.inv",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'convlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

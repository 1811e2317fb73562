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

import os
import sys

from convlens.core.lazy import lazy_exports

__version__ = "0.1.0"

# OpenMP threads that wait by sleeping, not spinning: torch's default (spinning) OpenMP threads burn the CPU
# share their busy siblings need, so on a machine whose cores other processes use, every parallel operation
# slowed down 2-30x (BENCHMARKS.md, section load; convlens.core.threads). libgomp reads the variable once,
# when torch loads it: set here, before convlens imports torch; a value the user set is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

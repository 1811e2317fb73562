"""INV: what each layer of a CNN sees, as weighted cluster maps with stable ids (Bianchi et al., IJCAI-24).

Per layer INV returns a variable number of *clusters* of feature maps (member channels, a weight in
percent of the layer, a cluster map at feature and input resolution): the objects people label in the
Deep Reveal game. Results are saved with a versioned manifest (``inv.json``) and read back by
:func:`load_inv_explanation`. Modules: ``explainer`` (:class:`INV`, :class:`INVParams`), ``weights``,
``clustering``, ``layers`` (which conv layers), ``results``, ``manifest`` (the file format, writer),
``reader`` (reading runs back), ``report`` (the layer-by-layer page), ``reveal`` (an image revealed through
one cluster map: numpy only, shared by the study server and TCAV).

Names are imported on first use, so ``convlens.inv.reveal`` and the reader never import torch.
"""

from __future__ import annotations

from convlens.core.lazy import lazy_exports

_EXPORTS = {
    "INV": "convlens.inv.explainer",
    "INVParams": "convlens.inv.explainer",
    "InvCluster": "convlens.inv.results",
    "InvExplanation": "convlens.inv.results",
    "InvLayer": "convlens.inv.results",
    "FORMAT_VERSION": "convlens.inv.manifest",
    "ManifestError": "convlens.inv.manifest",
    "load_inv_explanation": "convlens.inv.reader",
    "load_inv_with_input": "convlens.inv.reader",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

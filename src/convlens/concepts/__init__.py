"""Concepts: what each layer of a CNN sees, as addressable per-layer cluster maps.

This package lives beside :mod:`convlens.methods` rather than inside it because its results are not
saliency maps. A method in ``convlens.methods`` answers "where does the network look for class c?" with
one (B, H, W) map per image and plugs into the metrics and the comparison reports. INV (Bianchi et al.,
IJCAI-24) answers "what does each layer see?": per layer it returns a variable number of *clusters* of
feature maps, each with member channels, a weight in percent of the layer, and a cluster map at feature
and input resolution. These clusters are the objects a human labels in the Deep Reveal game and that a
label database references later, so they are saved with stable ids (image hash, layer, cluster index)
and read back by :func:`load_inv_explanation` — a different contract from
:class:`~convlens.core.explanation.Explanation`. The package depends only on ``convlens.core``, like the methods.

Modules: ``inv`` (the explainer and :class:`INVParams`), ``weights`` (map weights and thresholds),
``clustering`` (PCA, 2-D embedding, Ward), ``layers`` (which conv layers), ``results`` (the result
objects), ``manifest`` (``inv.json``: the versioned file format the study server reads), ``inv_report``
(the layer-by-layer page).
"""

from convlens.concepts.inv import INV, INVParams
from convlens.concepts.manifest import FORMAT_VERSION, ManifestError, load_inv_explanation
from convlens.concepts.results import InvCluster, InvExplanation, InvLayer

# The public surface: the explainer, its parameters, its results and their reader. INV's building blocks
# (weights, clustering, layer discovery, image digests) are documented in their modules and imported
# from there (e.g. ``convlens.concepts.clustering.cluster_feature_maps``).
__all__ = [
    "FORMAT_VERSION",
    "INV",
    "INVParams",
    "InvCluster",
    "InvExplanation",
    "InvLayer",
    "ManifestError",
    "load_inv_explanation",
]

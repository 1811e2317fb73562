"""INV's result objects: an image's explanation, its layers and their clusters.

These are the objects the Deep Reveal study reads back (:func:`~convlens.inv.load_inv_explanation`);
their file form, ``inv.json`` and its arrays, is described in :mod:`convlens.inv.manifest`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["InvCluster", "InvExplanation", "InvLayer"]


@dataclass
class InvCluster:
    """One cluster of feature maps of one layer.

    ``index`` is the cluster's rank by weight within its layer (0 = heaviest), the last part of its
    stable ``id`` ``"<image_id>:<layer>:<index>"``. Weights are percent of the whole layer.
    Maps are min-max normalised cluster maps A_C; ``None`` for weak (removed) clusters.
    """

    index: int
    channels: list[int]
    weight: float
    feature_map: np.ndarray | None = None  # (h, w)
    input_map: np.ndarray | None = None  # (H, W)
    id: str = ""

    @property
    def map_count(self) -> int:
        return len(self.channels)

    @property
    def average_weight(self) -> float:
        """w_C / |C|: the cluster's weight per member map."""
        return self.weight / len(self.channels) if self.channels else 0.0


@dataclass
class InvLayer:
    """INV's result for one layer: weights, pruning, embedding and clusters.

    Attributes:
        name: hooked module; ``conv``: the ``nn.Conv2d`` it belongs to (see :mod:`convlens.inv.layers`).
        alpha: (K,) raw coefficients; ``weights``: (K,) percent of the layer total.
        kept_channels: channels with ``w_k > prune_threshold``, in increasing order.
        labels: (n_kept,) cluster index (rank by weight) of every kept channel, before weak removal.
        embedding: (n_kept, 2) 2-D points (None when no embedding was needed).
        clusters: kept clusters sorted by weight (heaviest first); ``weak_clusters``: removed ones.
        layer_map: (H, W) the layer's Grad-CAM ``ReLU(sum_k alpha_k A_k)``, min-max normalised (display).
        conv_position: the layer's position among the network's convolutional layers in forward order
            (0 = first conv), the depth axis of trends over layers; None for a module that is not one
            of them (an explicitly named layer) or in a manifest of format version 1.
    """

    index: int
    name: str
    conv: str
    num_channels: int
    feature_size: tuple[int, int]
    alpha: np.ndarray
    weights: np.ndarray
    prune_threshold: float
    kept_channels: np.ndarray
    labels: np.ndarray
    embedding: np.ndarray | None
    n_clusters: int
    silhouettes: dict[int, float]
    pca_components: int
    perplexity: float | None
    weak_threshold: float
    clusters: list[InvCluster]
    weak_clusters: list[InvCluster]
    layer_map: np.ndarray
    fallback: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    conv_position: int | None = None

    @property
    def all_clusters(self) -> list[InvCluster]:
        return [*self.clusters, *self.weak_clusters]


@dataclass
class InvExplanation:
    """Layer-wise INV explanation of one image: a list of :class:`InvLayer`, saved as files + manifest.

    ``layer_choice`` says how the layers were chosen: ``{"rule": "tail" | "depth" | "convs" | "explicit",
    "num_layers": ..., "conv_layers": <number of conv layers found>, ...}`` (None when read from a
    manifest of format version 1, which did not record it).
    """

    image_id: str
    image_sha256: str
    target: int
    target_name: str | None
    score: float
    predicted: int
    input_size: tuple[int, int]
    layers: list[InvLayer]
    params: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    layer_choice: dict[str, Any] | None = None

    def layer(self, name: str) -> InvLayer:
        for layer in self.layers:
            if name in (layer.name, layer.conv):
                return layer
        raise KeyError(f"layer {name!r} not in this explanation: {[layer.name for layer in self.layers]}")

    def cluster(self, cluster_id: str) -> InvCluster:
        """The kept cluster with stable id ``"<image_id>:<layer>:<index>"``."""
        for layer in self.layers:
            for cluster in layer.clusters:
                if cluster.id == cluster_id:
                    return cluster
        raise KeyError(f"no cluster {cluster_id!r}")

    @property
    def clusters(self) -> list[InvCluster]:
        return [c for layer in self.layers for c in layer.clusters]

    def save(self, directory: str | os.PathLike[str], image: Any = None) -> Path:
        """Write the explanation into ``directory`` (see :func:`convlens.inv.manifest.save_inv_explanation`)."""
        from convlens.inv.manifest import save_inv_explanation

        return save_inv_explanation(self, directory, image)

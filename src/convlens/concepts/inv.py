"""INV — Interpretable Network Visualizations (Bianchi, De Santis, Tocchetti, Brambilla, IJCAI-24).

For every explained convolutional layer and the target class, INV

1. weights each feature map by a generalised Grad-CAM coefficient, as a percentage of the layer total
   (spec 4.2): ``alpha_k = mean_ij 1[A>0] 1[G>0] G`` ("guided", the authors' code) or the textbook
   ``alpha_k = mean_ij G`` ("gradcam", negative alphas clipped to 0 so percentages exist);
   ``w_k = 100 alpha_k / sum_k' alpha_k'``;
2. prunes maps with ``w_k <= d(K)`` (spec 4.3 step 1), min-max normalises each kept map, reduces them
   with PCA (<= 50 components, seed 432), embeds them in 2-D with t-SNE (seed 432, perplexity 30), and
   clusters the 2-D points with Ward agglomerative clustering, choosing k in 3..8 by the silhouette on
   the same 2-D points (steps 2-5);
3. gives each cluster the summed weight of its maps (percent of the *whole* layer, pruned maps
   included, step 6), removes weak clusters ``w_C < max(max_j w_Cj / 3, mean_j w_Cj / 2)`` (step 7),
   and draws each kept cluster as the weight-averaged *raw* activation of its maps, up-sampled
   bilinearly and min-max normalised (step 8).

Guards for small layers (spec 4.10a item 9), documented choices:

* no map above the pruning threshold (or no positive gradient at all): the layer has no cluster;
* 1-3 kept maps: no embedding, each kept map is its own cluster (k in 3..8 needs >= 4 points for a
  silhouette);
* n kept maps with n <= perplexity (sklearn refuses perplexity >= n; the paper's code would crash):
  t-SNE perplexity lowered to ``(n - 1) / 3``, openTSNE's own rule (with ``embedding="opentsne"`` the
  rule applies whenever ``3 perplexity > n - 1``, as openTSNE would do itself); larger layers keep the
  paper's perplexity 30 exactly;
* k is limited to ``3..min(8, n - 1)`` (a silhouette needs k <= n - 1).

PCA, t-SNE and clustering run single-threaded (threadpoolctl): the Barnes-Hut normalisation is an
OpenMP reduction whose rounding depends on the thread count, so one thread removes the thread count as
a source of differences (and avoids BLAS thread oversubscription, which made a 25 x 1024 PCA 200x
slower on a busy 2-core machine); ``n_jobs`` runs *layers* in parallel threads instead (results are identical for
every ``n_jobs``; the speed-up needs free cores: 0.9-1.5x measured on a shared 2-core machine). The
per-layer torch work (weights, maps) runs with one torch thread: its tensors are tiny, and on a busy
2-core machine two intra-op threads made each small op ~30 ms instead of microseconds.
``embedding="opentsne"`` (openTSNE, if installed) and ``embedding="pca"`` (first two principal
components, no t-SNE) are faster options; their effect on the clusters is measured in
``benchmarks/bench_inv.py``.

Reproducibility: the same input on the same machine and settings gives identical clusters (tested),
but the pipeline is chaotic in its input. Relative perturbations of 1e-6 of the kept maps — the size
of the differences between one and two torch threads in the forward pass — change the t-SNE layout
and often the silhouette's k (adjusted Rand index ~0.3-0.6 against the unperturbed clusters, measured
in the benchmark). So the saved clusters, not a re-computation, are the reference: the manifest written
by :meth:`InvExplanation.save` records every cluster with its stable id, members and maps, plus the
library versions (spec 4.10a item 3).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from convlens.concepts.layers import ConvLayer, find_conv_layers
from convlens.core.explanation import atomic_directory
from convlens.core.hooks import eval_mode, forward_with_grads
from convlens.core.inputs import as_image_batch
from convlens.core.layers import LayerSpec, describe_layers, resolve_layers
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.targets import OutputAdapter, ScoreKind, TargetSpec, class_scores, resolve_targets

__all__ = [
    "EMBEDDINGS",
    "INV",
    "INV_SEED",
    "WEIGHTINGS",
    "ClusteringResult",
    "InvCluster",
    "InvExplanation",
    "InvLayer",
    "channel_weights",
    "cluster_feature_maps",
    "embed_2d",
    "image_digest",
    "load_inv_explanation",
    "minmax_rows",
    "prune_threshold",
    "weak_cluster_threshold",
]

logger = logging.getLogger("convlens.inv")

INV_SEED = 432  # dataLoader.py / main.ipynb
DEFAULT_NUM_LAYERS = 9  # block3_conv1 .. block5_conv3
MANIFEST = "inv.json"
FORMAT_VERSION = 1

Weighting = Literal["guided", "gradcam"]
Embedding = Literal["tsne", "opentsne", "pca"]
WEIGHTINGS: tuple[str, ...] = ("guided", "gradcam")
EMBEDDINGS: tuple[str, ...] = ("tsne", "opentsne", "pca")


# ---------------------------------------------------------------------------------------------- weights
def channel_weights(
    activations: torch.Tensor, gradients: torch.Tensor, weighting: Weighting = "guided"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map coefficients and their percentages of the layer total (spec 4.2).

    Args:
        activations: (B, K, h, w) feature maps ``A``.
        gradients: (B, K, h, w) ``dy^c / dA`` of the target logit.
        weighting: ``"guided"``: ``alpha_k = mean_ij 1[A_ij>0] 1[G_ij>0] G_ij`` (INV code, >= 0 by
            construction); ``"gradcam"``: ``alpha_k = mean_ij G_ij`` (Grad-CAM Eq. 1), whose negative
            values are clipped to 0 before the percentages (a negative share of a total is meaningless).

    Returns:
        ``(alpha, percent)``, both (B, K): the raw coefficients (negative allowed for ``"gradcam"``) and, in
        float64, ``w_k = 100 max(alpha_k, 0) / sum_k' max(alpha_k', 0)`` (all zeros if the sum is 0).
    """
    if activations.shape != gradients.shape or activations.ndim != 4:
        raise ValueError(
            f"activations {tuple(activations.shape)} and gradients {tuple(gradients.shape)} must both be (B, K, h, w)"
        )
    if weighting == "guided":
        guided = gradients * (activations > 0) * (gradients > 0)
        alpha = guided.mean(dim=(2, 3))
    elif weighting == "gradcam":
        alpha = gradients.mean(dim=(2, 3))
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    positive = alpha.clamp_min(0).double()
    total = positive.sum(dim=1, keepdim=True)
    percent = torch.where(total > 0, 100.0 * positive / total.clamp_min(1e-300), torch.zeros_like(positive))
    return alpha, percent


def prune_threshold(num_channels: int) -> float:
    """d(K) of the pruning rule (spec 4.3 step 1, ``computeDiscardValue``): keep map k iff w_k > d(K).

    0.175 % for K >= 512, 0.35 for K >= 256, 0.7 for K >= 128, 1.4 for K >= 64, else 76.8 / K.
    """
    if num_channels < 1:
        raise ValueError(f"a layer needs at least one channel, got {num_channels}")
    for minimum, threshold in ((512, 0.175), (256, 0.35), (128, 0.7), (64, 1.4)):
        if num_channels >= minimum:
            return threshold
    return 76.8 / num_channels


def weak_cluster_threshold(cluster_weights: Sequence[float] | np.ndarray) -> float:
    """Weak-cluster bound of spec 4.3 step 7: clusters with ``w_C < max(max w / 3, mean w / 2)`` go."""
    values = np.asarray(cluster_weights, dtype=np.float64)
    if values.size == 0:
        return 0.0
    return float(max(values.max() / 3.0, values.mean() / 2.0))


def minmax_rows(rows: np.ndarray) -> np.ndarray:
    """Min-max normalise each row to [0, 1]; constant rows are left unchanged (spec 4.3 step 2)."""
    rows = np.asarray(rows, dtype=np.float64)
    lo = rows.min(axis=1, keepdims=True)
    span = rows.max(axis=1, keepdims=True) - lo
    constant = span <= 0
    return np.where(constant, rows, (rows - lo) / np.where(constant, 1.0, span))


# ------------------------------------------------------------------------------------------- clustering
@dataclass
class ClusteringResult:
    """Outcome of :func:`cluster_feature_maps` for one layer's kept maps.

    ``labels`` (n,) hold cluster ids 0..k-1 as returned by the Ward fit with the chosen k;
    ``silhouettes`` maps each tried k to its silhouette on ``embedding``.
    """

    labels: np.ndarray
    embedding: np.ndarray | None
    n_clusters: int
    silhouettes: dict[int, float]
    pca_components: int
    perplexity: float | None
    fallback: str | None
    timings: dict[str, float] = field(default_factory=dict)


def embed_2d(
    features: np.ndarray, method: Embedding = "tsne", seed: int = INV_SEED, perplexity: float = 30.0
) -> np.ndarray:
    """2-D embedding of (n, d) features: sklearn t-SNE (spec 4.3 step 4), openTSNE, or the first two
    principal components (``features`` are PCA scores already, so their first two columns).

    t-SNE runs on one OpenMP thread (see module docstring) with ``random_state=seed``; sklearn's
    defaults otherwise (``init="pca"``, ``learning_rate="auto"``, 1000 iterations), ``init="random"``
    when the features have a single dimension. With the PCA initialisation, sklearn's Barnes-Hut t-SNE is
    deterministic given the data, so the seed hardly changes the result (observed: identical embeddings
    for seeds 432 and 7); it is still passed, as the spec asks.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dims = features.shape
    if method == "pca":
        points = np.zeros((n, 2), dtype=np.float64)
        points[:, : min(2, dims)] = features[:, :2]
        return points
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        if method == "tsne":
            from sklearn.manifold import TSNE

            init = "pca" if dims >= 2 else "random"
            tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init=init)
            return tsne.fit_transform(features).astype(np.float64)
        if method == "opentsne":
            try:
                import openTSNE
            except ImportError as exc:
                raise ValueError("embedding='opentsne' needs the openTSNE package: pip install openTSNE") from exc
            tsne = openTSNE.TSNE(
                n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1,
                negative_gradient_method="bh", initialization="pca" if dims >= 2 else "random", verbose=False,
            )
            return np.asarray(tsne.fit(features), dtype=np.float64)
    raise ValueError(f"unknown embedding {method!r}; choose one of {EMBEDDINGS}")


def cluster_feature_maps(
    maps: np.ndarray,
    seed: int = INV_SEED,
    max_pca_components: int = 50,
    perplexity: float = 30.0,
    embedding: Embedding = "tsne",
    cluster_range: tuple[int, int] = (3, 8),
) -> ClusteringResult:
    """Cluster feature maps as INV does (spec 4.3 steps 2-5).

    Args:
        maps: (n, h, w) or (n, h*w) raw kept feature maps.
        seed: random state of PCA and t-SNE (INV: 432).
        max_pca_components: PCA keeps ``min(max_pca_components, n, h*w)`` components.
        perplexity: t-SNE perplexity (lowered to ``(n-1)/3`` for small n, see module docstring).
        embedding: ``"tsne"`` (sklearn, the paper's), ``"opentsne"`` or ``"pca"``.
        cluster_range: smallest and largest k tried (inclusive); the silhouette on the 2-D points picks
            k, ties going to the smallest k.
    """
    from threadpoolctl import threadpool_limits

    k_min, k_max = cluster_range
    if not 2 <= k_min <= k_max:
        raise ValueError(f"cluster_range must be (k_min, k_max) with 2 <= k_min <= k_max, got {cluster_range}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
    with threadpool_limits(limits=1):  # BLAS and OpenMP: same numbers on every machine, no oversubscription
        vectors = np.asarray(maps, dtype=np.float64)
        return _cluster(vectors, seed, max_pca_components, perplexity, embedding, k_min, k_max)


def _cluster(
    maps: np.ndarray, seed: int, max_pca_components: int, perplexity: float, embedding: Embedding, k_min: int,
    k_max: int,
) -> ClusteringResult:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    if maps.ndim < 2:
        raise ValueError(f"expected (n, h, w) or (n, h*w) feature maps, got shape {maps.shape}")
    vectors = maps.reshape(maps.shape[0], int(np.prod(maps.shape[1:])))
    n = vectors.shape[0]
    timings: dict[str, float] = {"pca": 0.0, "embedding": 0.0, "clustering": 0.0}
    if n == 0:
        return ClusteringResult(np.zeros(0, dtype=np.int64), None, 0, {}, 0, None, "no kept map", timings)
    if n <= k_min:
        return ClusteringResult(
            np.arange(n, dtype=np.int64), None, n, {}, 0, None,
            f"{n} kept map(s) < {k_min + 1}: one cluster per map, no embedding", timings,
        )
    t0 = time.perf_counter()
    normalized = minmax_rows(vectors)
    n_components = min(max_pca_components, n, normalized.shape[1])
    reduced = PCA(n_components=n_components, random_state=seed).fit_transform(normalized)
    t1 = time.perf_counter()
    fallback = None
    used_perplexity: float | None = None
    if embedding in ("tsne", "opentsne"):
        used_perplexity = float(perplexity)
        # sklearn refuses perplexity >= n; openTSNE itself lowers any perplexity > (n - 1) / 3
        too_large = perplexity >= n if embedding == "tsne" else 3 * perplexity > n - 1
        if too_large:
            used_perplexity = (n - 1) / 3
            fallback = f"perplexity lowered from {perplexity:g} to {used_perplexity:.3g} for {n} kept maps"
    points = embed_2d(reduced, embedding, seed, used_perplexity or perplexity)
    t2 = time.perf_counter()
    upper = min(k_max, n - 1)
    if upper < k_max:
        note = f"k limited to {k_min}..{upper} for {n} kept maps"
        fallback = note if fallback is None else f"{fallback}; {note}"
    silhouettes: dict[int, float] = {}
    best_k, best_score, best_labels = k_min, -math.inf, None
    for k in range(k_min, upper + 1):
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(points)
        # all points identical -> a single label: silhouette undefined, rank it last
        score = float(silhouette_score(points, labels)) if len(np.unique(labels)) > 1 else -1.0
        silhouettes[k] = score
        if score > best_score:
            best_k, best_score, best_labels = k, score, labels
    assert best_labels is not None
    timings.update(pca=t1 - t0, embedding=t2 - t1, clustering=time.perf_counter() - t2)
    return ClusteringResult(
        best_labels.astype(np.int64), points, best_k, silhouettes, n_components, used_perplexity, fallback, timings
    )


# ---------------------------------------------------------------------------------------------- results
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
        """w_C / |C| (spec 4.3 outputs)."""
        return self.weight / len(self.channels) if self.channels else 0.0


@dataclass
class InvLayer:
    """INV's result for one layer: weights, pruning, embedding and clusters.

    Attributes:
        name: hooked module; ``conv``: the ``nn.Conv2d`` it belongs to (see :mod:`convlens.concepts.layers`).
        alpha: (K,) raw coefficients; ``weights``: (K,) percent of the layer total.
        kept_channels: channels with ``w_k > prune_threshold``, in increasing order.
        labels: (n_kept,) cluster index (rank by weight) of every kept channel, before weak removal.
        embedding: (n_kept, 2) 2-D points (None when no embedding was needed).
        clusters: kept clusters sorted by weight (heaviest first); ``weak_clusters``: removed ones.
        layer_map: (H, W) the layer's Grad-CAM ``ReLU(sum_k alpha_k A_k)``, min-max (spec 4.2, display).
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

    @property
    def all_clusters(self) -> list[InvCluster]:
        return [*self.clusters, *self.weak_clusters]


@dataclass
class InvExplanation:
    """Layer-wise INV explanation of one image: a list of :class:`InvLayer`, saved as files + manifest."""

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
        """Write the explanation into ``directory`` (atomically; replaced if present).

        Files: ``inv.json`` (manifest with stable cluster ids), per layer ``LNN/weights.npy`` (percent),
        ``alpha.npy``, ``kept.npy``, ``labels.npy``, ``embedding.npy``, ``layer_map.npy`` and per kept
        cluster ``cC_feature.npy`` (h, w), ``cC_input.npy`` (H, W); with ``image`` (PIL or (H, W, 3)
        uint8) also overlays ``cC.png`` and ``layer_map.png`` (Gaussian blur sigma 1, truncate 5.5, jet,
        alpha 0.5 — the authors' explainer overlays) and ``input.png``. Returns the manifest path.
        """
        from convlens.reports.overlay import overlay_map

        display = _display_image(image, self.input_size) if image is not None else None
        with atomic_directory(directory) as tmp:
            manifest = self._manifest()
            if display is not None:
                display.save(tmp / "input.png")
                manifest["files"] = {"input": "input.png"}
            for layer, layer_entry in zip(self.layers, manifest["layers"], strict=True):
                sub = tmp / layer_entry["dir"]
                sub.mkdir()
                arrays = {
                    "weights": layer.weights, "alpha": layer.alpha, "kept": layer.kept_channels,
                    "labels": layer.labels, "layer_map": layer.layer_map,
                }
                if layer.embedding is not None:
                    arrays["embedding"] = layer.embedding
                for key, value in arrays.items():
                    np.save(sub / f"{key}.npy", np.asarray(value))
                    layer_entry["files"][key] = f"{layer_entry['dir']}/{key}.npy"
                if display is not None:
                    overlay_map(display, _blur(layer.layer_map)).save(sub / "layer_map.png")
                    layer_entry["files"]["layer_overlay"] = f"{layer_entry['dir']}/layer_map.png"
                for cluster, entry in zip(layer.clusters, layer_entry["clusters"], strict=True):
                    assert cluster.feature_map is not None and cluster.input_map is not None
                    stem = f"c{cluster.index}"
                    np.save(sub / f"{stem}_feature.npy", cluster.feature_map.astype(np.float32))
                    np.save(sub / f"{stem}_input.npy", cluster.input_map.astype(np.float32))
                    entry["files"] = {
                        "feature_map": f"{layer_entry['dir']}/{stem}_feature.npy",
                        "input_map": f"{layer_entry['dir']}/{stem}_input.npy",
                    }
                    if display is not None:
                        overlay_map(display, _blur(cluster.input_map)).save(sub / f"{stem}.png")
                        entry["files"]["overlay"] = f"{layer_entry['dir']}/{stem}.png"
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return Path(directory) / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            layers.append({
                "index": layer.index,
                "name": layer.name,
                "conv": layer.conv,
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
            })
        return {
            "format": "convlens-inv",
            "format_version": FORMAT_VERSION,
            "image_id": self.image_id,
            "image_sha256": self.image_sha256,
            "model": self.model,
            "target": self.target,
            "target_name": self.target_name,
            "score": self.score,
            "predicted": self.predicted,
            "input_size": list(self.input_size),
            "params": self.params,
            "versions": self.versions,
            "timings": self.timings,
            "layers": layers,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> InvExplanation:
        """Read back what :meth:`save` wrote (arrays and manifest)."""
        return load_inv_explanation(directory)


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


def load_inv_explanation(directory: str | os.PathLike[str]) -> InvExplanation:
    """Load an :class:`InvExplanation` saved by :meth:`InvExplanation.save`."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no INV manifest (expected a directory written by InvExplanation.save)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "convlens-inv":
        raise ValueError(f"{path} is not a convlens INV manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version")
        raise ValueError(f"{path}: format version {version}, this convlens reads {FORMAT_VERSION}")

    def array(files: dict[str, str], key: str) -> np.ndarray | None:
        return np.load(directory / files[key]) if key in files else None

    layers = []
    for entry in manifest["layers"]:
        files = entry["files"]
        clusters = [
            InvCluster(
                c["index"], c["channels"], c["weight"], array(c["files"], "feature_map"),
                array(c["files"], "input_map"), c["id"],
            )
            for c in entry["clusters"]
        ]
        weak = [InvCluster(c["index"], c["channels"], c["weight"]) for c in entry["weak_clusters"]]
        layers.append(InvLayer(
            index=entry["index"], name=entry["name"], conv=entry["conv"], num_channels=entry["channels"],
            feature_size=tuple(entry["feature_size"]), alpha=array(files, "alpha"), weights=array(files, "weights"),
            prune_threshold=entry["prune_threshold"], kept_channels=array(files, "kept"),
            labels=array(files, "labels"), embedding=array(files, "embedding"), n_clusters=entry["n_clusters"],
            silhouettes={int(k): v for k, v in entry["silhouettes"].items()}, pca_components=entry["pca_components"],
            perplexity=entry["perplexity"], weak_threshold=entry["weak_threshold"], clusters=clusters,
            weak_clusters=weak, layer_map=array(files, "layer_map"), fallback=entry["fallback"],
            timings=entry["timings"],
        ))
    return InvExplanation(
        image_id=manifest["image_id"], image_sha256=manifest["image_sha256"], target=manifest["target"],
        target_name=manifest["target_name"], score=manifest["score"], predicted=manifest["predicted"],
        input_size=tuple(manifest["input_size"]), layers=layers, params=manifest["params"],
        timings=manifest["timings"], versions=manifest["versions"], model=manifest["model"],
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "layer"


def _blur(saliency: np.ndarray) -> np.ndarray:
    """Overlay smoothing of the INV explainer: Gaussian sigma 1, truncate 5.5, then back to [0, 1]."""
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(np.asarray(saliency, dtype=np.float64), sigma=1.0, truncate=5.5)
    lo, hi = blurred.min(), blurred.max()
    return (blurred - lo) / (hi - lo) if hi > lo else np.zeros_like(blurred)


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


def image_digest(image: Any) -> str:
    """SHA-256 hex digest identifying an image: of the file bytes (path or bytes), of the RGB pixels
    (PIL image / uint8 array, shape included) or of the float32 tensor values (shape included)."""
    sha = hashlib.sha256()
    if isinstance(image, str | os.PathLike):
        sha.update(Path(image).read_bytes())
    elif isinstance(image, bytes | bytearray):
        sha.update(bytes(image))
    elif isinstance(image, torch.Tensor):
        values = image.detach().float().cpu().contiguous()
        sha.update(str(tuple(values.shape)).encode())
        sha.update(values.numpy().tobytes())
    else:
        from PIL import Image

        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        sha.update(str(array.shape).encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


# ------------------------------------------------------------------------------------------------ method
class INV:
    """INV layer-wise explanations: per layer, clusters of feature maps weighted by generalised Grad-CAM.

    Args:
        model: the classifier (``nn.Module`` or :class:`~convlens.models.LoadedModel`).
        layers: None = the last ``num_layers`` convolutional layers (see
            :func:`~convlens.concepts.layers.find_conv_layers`; fewer if the model has fewer, with a
            warning); ``"convs"`` = all of them; otherwise a :func:`~convlens.core.layers.resolve_layers`
            spec (names, modules, ``"blocks"``, ``"last"``), explained in forward order whatever the order
            given. A named ``nn.Conv2d`` is replaced by the end of its conv -> norm -> activation chain when
            ``post_activation`` is true.
        num_layers: how many conv layers the default takes (INV: 9, block3_conv1..block5_conv3 of VGG16).
        post_activation: use Keras-like conv outputs (after the directly following norm/activation).
        weighting: ``"guided"`` (INV code, default) or ``"gradcam"`` (see :func:`channel_weights`).
        score: the differentiated score (spec 4.1: the logit).
        embedding: ``"tsne"`` (sklearn, the paper's), ``"opentsne"`` or ``"pca"``.
        seed: random state of PCA and t-SNE (INV: 432).
        perplexity, max_pca_components, cluster_range: spec 4.3 (30, 50, (3, 8)).
        n_jobs: layers clustered in parallel threads (each t-SNE single-threaded: same results for any
            value); default 1 (sklearn's convention), None = one thread per CPU core, at most one per layer.
        output_adapter, class_names: as for every convlens explainer.
    """

    name = "inv"
    paper = "Bianchi, De Santis, Tocchetti, Brambilla, INV: Interpretable Network Visualizations, IJCAI-24"

    def __init__(
        self,
        model: nn.Module | Any,
        layers: LayerSpec | None = None,
        num_layers: int = DEFAULT_NUM_LAYERS,
        post_activation: bool = True,
        weighting: Weighting = "guided",
        score: ScoreKind = "logit",
        embedding: Embedding = "tsne",
        seed: int = INV_SEED,
        perplexity: float = 30.0,
        max_pca_components: int = 50,
        cluster_range: tuple[int, int] | Sequence[int] = (3, 8),
        n_jobs: int | None = 1,
        output_adapter: OutputAdapter | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        model_name = None
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # LoadedModel
            class_names = class_names or getattr(model, "class_names", None)
            model_name = getattr(model, "name", None)
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
        if score not in ("logit", "softmax", "sigmoid"):
            raise ValueError(f"unknown score {score!r}: use logit, softmax or sigmoid")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if n_jobs is not None and n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
        if not perplexity > 0:
            raise ValueError(f"perplexity must be > 0, got {perplexity}")
        if max_pca_components < 1:
            raise ValueError(f"max_pca_components must be >= 1, got {max_pca_components}")
        cluster_range = tuple(int(k) for k in cluster_range)
        if len(cluster_range) != 2 or not 2 <= cluster_range[0] <= cluster_range[1]:
            raise ValueError(f"cluster_range must be (k_min, k_max) with 2 <= k_min <= k_max, got {cluster_range}")
        if embedding == "opentsne":
            try:
                import openTSNE  # noqa: F401
            except ImportError as exc:
                raise ValueError("embedding='opentsne' needs the openTSNE package: pip install openTSNE") from exc
        self.model = model
        self.model_name = model_name
        self.layer_spec = layers
        self.num_layers = num_layers
        self.post_activation = post_activation
        self.weighting: Weighting = weighting
        self.score: ScoreKind = score
        self.embedding: Embedding = embedding
        self.seed = seed
        self.perplexity = float(perplexity)
        self.max_pca_components = max_pca_components
        self.cluster_range: tuple[int, int] = (cluster_range[0], cluster_range[1])
        self.n_jobs = n_jobs
        self.output_adapter = output_adapter
        self.class_names = list(class_names) if class_names else None
        self._layers: list[ConvLayer] | None = None
        self._layers_for: tuple[int, ...] | None = None

    def params(self) -> dict[str, Any]:
        """The knobs recorded in every result."""
        return {
            "layers": self.layer_spec if isinstance(self.layer_spec, str | None) else [str(x) for x in self.layer_spec],
            "num_layers": self.num_layers, "post_activation": self.post_activation, "weighting": self.weighting,
            "score": self.score, "embedding": self.embedding, "seed": self.seed, "perplexity": self.perplexity,
            "max_pca_components": self.max_pca_components, "cluster_range": list(self.cluster_range),
        }

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def layers_for(self, input_shape: Sequence[int]) -> list[ConvLayer]:
        """The explained layers for inputs of shape (C, H, W), in forward order (resolved once per shape)."""
        shape = tuple(int(s) for s in input_shape)
        if self._layers is not None and self._layers_for == shape:
            return self._layers
        convs = find_conv_layers(self.model, shape, self.post_activation)
        spec = self.layer_spec
        if spec is None or spec == "convs":
            if not convs:
                raise ValueError(f"{type(self.model).__name__} has no nn.Conv2d with a spatial output: INV needs a CNN")
            chosen = convs if spec == "convs" else convs[-self.num_layers :]
            if spec is None and len(convs) < self.num_layers:
                warnings.warn(
                    f"{type(self.model).__name__} has only {len(convs)} convolutional layers; INV explains all of "
                    f"them (num_layers={self.num_layers})",
                    UserWarning, stacklevel=3,
                )
        else:
            by_conv = {c.conv: c for c in convs}
            by_name = {c.name: c for c in convs}
            chosen = []
            for name in resolve_layers(self.model, spec, shape):
                if name in by_conv or name in by_name:
                    chosen.append(by_conv.get(name) or by_name[name])
                else:
                    chosen.append(ConvLayer(name, name, 0, (0, 0)))  # any other 4-D module: used as is
            order = describe_layers(self.model, shape)
            chosen = sorted(dict.fromkeys(chosen), key=lambda c: order[c.name].order)  # forward order
        self._layers, self._layers_for = chosen, shape
        logger.info("INV layers: %s", ", ".join(c.label for c in chosen))
        return chosen

    def explain(self, x: torch.Tensor, target: TargetSpec = None, image_id: str | None = None) -> InvExplanation:
        """Explain one image ``x`` (C, H, W) or (1, C, H, W) for ``target`` (None = predicted class).

        ``image_id``: SHA-256 hex digest naming the image (default: :func:`image_digest` of ``x``); its
        first 16 characters prefix every cluster id.
        """
        if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] != 1:
            raise ValueError(f"explain takes one image; use explain_batch for {x.shape[0]} images")
        ids = None if image_id is None else [image_id]
        targets = target if target is None or isinstance(target, str | int) else [int(t) for t in target]
        return self.explain_batch(x, targets, ids)[0]

    __call__ = explain

    def explain_batch(
        self, x: torch.Tensor, targets: TargetSpec = None, image_ids: Sequence[str] | None = None
    ) -> list[InvExplanation]:
        """Explain a batch (B, C, H, W) with one forward + one backward; one :class:`InvExplanation` each."""
        x = as_image_batch(x)
        if image_ids is not None and len(image_ids) != x.shape[0]:
            raise ValueError(f"got {len(image_ids)} image ids for {x.shape[0]} images")
        from threadpoolctl import threadpool_limits

        start = time.perf_counter()
        x = x.to(self.device, dtype=torch.float32)
        layers = self.layers_for(x.shape[1:])
        chosen_ids: dict[str, torch.Tensor] = {}

        def score_fn(logits: torch.Tensor) -> torch.Tensor:
            ids = resolve_targets(logits.detach(), targets, self.class_names)
            chosen_ids["ids"] = ids
            return class_scores(logits, ids, self.score)

        with eval_mode(self.model):
            logits, acts, grads = forward_with_grads(
                self.model, x, [layer.name for layer in layers], score_fn, self.output_adapter
            )
        class_ids = chosen_ids["ids"]
        scores = class_scores(logits, class_ids, self.score)
        predicted = logits.argmax(dim=1)
        t_fb = time.perf_counter() - start
        for layer in layers:
            if acts[layer.name].ndim != 4:
                shape = tuple(acts[layer.name].shape)
                raise ValueError(f"layer {layer.name!r} outputs shape {shape}, not (B, K, h, w)")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        results = []
        for b in range(x.shape[0]):
            t0 = time.perf_counter()
            digest = image_ids[b] if image_ids is not None else image_digest(x[b])
            if not re.fullmatch(r"[0-9a-fA-F]{16,}", digest):
                raise ValueError(f"image id must be a hex digest (>= 16 characters), got {digest!r}")
            short_id = digest[:16].lower()
            jobs = [
                (i, layer, acts[layer.name][b : b + 1].float(), grads[layer.name][b : b + 1].float())
                for i, layer in enumerate(layers)
            ]
            # BLAS limited once here (process-wide) so that the per-call limits inside the worker threads
            # all restore the same value; OpenMP limits are per thread and set in each call
            with threadpool_limits(limits=1, user_api="blas"), _single_torch_thread():
                workers = min(len(jobs), self.n_jobs or os.cpu_count() or 1)
                if workers > 1:
                    with ThreadPoolExecutor(max_workers=workers) as pool:
                        futures = [pool.submit(self._explain_layer, *job, size, short_id) for job in jobs]
                        inv_layers = [future.result() for future in futures]
                else:
                    inv_layers = [self._explain_layer(*job, size, short_id) for job in jobs]
            timings = {"forward_backward": t_fb}
            for step in ("weights", "pca", "embedding", "clustering", "maps"):
                timings[step] = float(sum(layer.timings.get(step, 0.0) for layer in inv_layers))
            timings["layers_wall"] = time.perf_counter() - t0
            timings["total"] = t_fb + timings["layers_wall"]
            target = int(class_ids[b])
            results.append(InvExplanation(
                image_id=short_id, image_sha256=digest.lower(), target=target,
                target_name=self.class_names[target] if self.class_names and target < len(self.class_names) else None,
                score=float(scores[b]), predicted=int(predicted[b]), input_size=size, layers=inv_layers,
                params=self.params(), timings=timings, versions=_versions(), model=self.model_name,
            ))
        return results

    def _explain_layer(
        self, index: int, conv_layer: ConvLayer, activations: torch.Tensor, gradients: torch.Tensor,
        size: tuple[int, int], image_id: str,
    ) -> InvLayer:
        """Spec 4.2-4.3 for one layer of one image: activations/gradients (1, K, h, w)."""
        t0 = time.perf_counter()
        alpha, percent = channel_weights(activations, gradients, self.weighting)
        alpha_np = alpha[0].double().cpu().numpy()
        weights = percent[0].double().cpu().numpy()
        num_channels, h, w = (int(s) for s in activations.shape[1:])
        threshold = prune_threshold(num_channels)
        kept = np.flatnonzero(weights > threshold)
        raw = activations[0].double().cpu()  # (K, h, w) raw activations
        layer_cam = torch.relu(torch.einsum("k,khw->hw", alpha[0].double().cpu(), raw))
        layer_map = minmax_normalize(upsample(layer_cam, size)).numpy()
        t1 = time.perf_counter()
        result = cluster_feature_maps(
            raw[kept].numpy(), seed=self.seed, max_pca_components=self.max_pca_components,
            perplexity=self.perplexity, embedding=self.embedding, cluster_range=self.cluster_range,
        )
        t2 = time.perf_counter()
        fallback = result.fallback
        if weights.sum() == 0:
            fallback = "no positive gradient in this layer: all weights are 0, no cluster"
        # cluster weights (percent of the whole layer) and ranking: heaviest first, ties by first channel
        members = [kept[result.labels == label] for label in range(result.n_clusters)]
        cluster_weights = [float(weights[m].sum()) for m in members]
        order = sorted(range(result.n_clusters), key=lambda c: (-cluster_weights[c], int(members[c][0])))
        rank = np.empty(result.n_clusters, dtype=np.int64)
        rank[order] = np.arange(result.n_clusters)
        weak_bound = weak_cluster_threshold(cluster_weights)
        clusters: list[InvCluster] = []
        weak: list[InvCluster] = []
        for position, c in enumerate(order):
            channels = [int(k) for k in members[c]]
            if cluster_weights[c] < weak_bound:
                weak.append(InvCluster(position, channels, cluster_weights[c]))
                continue
            member_weights = torch.from_numpy(weights[members[c]])
            mean_map = torch.einsum("k,khw->hw", member_weights, raw[members[c]]) / member_weights.sum()
            clusters.append(InvCluster(
                index=position, channels=channels, weight=cluster_weights[c],
                feature_map=minmax_normalize(mean_map).float().numpy(),
                input_map=minmax_normalize(upsample(mean_map, size)).float().numpy(),
                id=f"{image_id}:{conv_layer.name}:{position}",
            ))
        t3 = time.perf_counter()
        timings = {
            "weights": t1 - t0, "pca": result.timings["pca"], "embedding": result.timings["embedding"],
            "clustering": result.timings["clustering"], "maps": t3 - t2,
        }
        return InvLayer(
            index=index, name=conv_layer.name, conv=conv_layer.conv, num_channels=num_channels, feature_size=(h, w),
            alpha=alpha_np, weights=weights, prune_threshold=threshold, kept_channels=kept,
            labels=rank[result.labels] if len(kept) else np.zeros(0, dtype=np.int64),
            embedding=result.embedding, n_clusters=result.n_clusters, silhouettes=result.silhouettes,
            pca_components=result.pca_components, perplexity=result.perplexity, weak_threshold=weak_bound,
            clusters=clusters, weak_clusters=weak, layer_map=layer_map.astype(np.float32), fallback=fallback,
            timings=timings,
        )


@contextlib.contextmanager
def _single_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for the body (process-wide setting, restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _versions() -> dict[str, str]:
    import platform

    import sklearn

    import convlens

    return {
        "convlens": convlens.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "scikit-learn": sklearn.__version__, "python": platform.python_version(),
    }

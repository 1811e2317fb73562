"""INV — Interpretable Network Visualizations (Bianchi, De Santis, Tocchetti, Brambilla, IJCAI-24).

For every explained convolutional layer and the target class, INV

1. weights each feature map by a generalised Grad-CAM coefficient, as a percentage of the layer total
   (:func:`~convlens.inv.weights.channel_weights`: "guided" as the authors' code, or Grad-CAM Eq. 1);
2. prunes maps with ``w_k <= d(K)``, and clusters the kept, min-max normalised maps: PCA (<= 50 components),
   t-SNE to 2-D, Ward clustering with k in 3..8 chosen by the silhouette (:mod:`convlens.inv.clustering`);
3. gives each cluster the summed weight of its maps (percent of the *whole* layer), removes weak clusters
   ``w_C < max(max_j w_Cj / 3, mean_j w_Cj / 2)``, and draws each kept cluster as the weight-averaged *raw*
   activation of its maps, up-sampled bilinearly and min-max normalised.

Which layers: the paper's last ``num_layers`` conv layers by default (:mod:`convlens.inv.layers`).
Why the saved clusters are the reference: the same input and settings give identical clusters on one
machine (tested), but the pipeline is chaotic in its input — perturbations the size of one vs two torch
threads' rounding change the t-SNE layout and often k (BENCHMARKS.md, section ``inv``) — so the manifest
(:mod:`convlens.inv.manifest`) records every cluster with its stable id, members, maps and library versions.
Threads: clustering runs on one BLAS/OpenMP thread, the per-layer torch work on one torch thread
(:func:`convlens.core.threads.limit_threads`); ``n_jobs`` clusters layers in parallel with identical results.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from convlens.core.binding import BoundExplainer
from convlens.core.hooks import eval_mode, forward_with_grads
from convlens.core.inputs import as_image_batch, explained_input
from convlens.core.layers import describe_layers, resolve_layers
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.params import MethodParams, ParamError, param
from convlens.core.targets import ScoreKind, TargetSpec
from convlens.core.threads import limit_threads
from convlens.inv.clustering import (
    INV_SEED,
    ClusteringResult,
    blas_single_thread,
    cluster_maps_unlimited,
    openmp_limiter,
)
from convlens.inv.layers import LAYER_RULES, ConvLayer, choose_conv_layers, find_conv_layers
from convlens.inv.manifest import image_digest
from convlens.inv.results import InvCluster, InvExplanation, InvLayer
from convlens.inv.weights import channel_weights, prune_threshold, weak_cluster_threshold

__all__ = ["INV", "INVParams"]

logger = logging.getLogger("convlens.inv")


@dataclass(frozen=True)
class INVParams(MethodParams):
    """INV's parameters (defaults: the paper's code)."""

    method: ClassVar[str] = "inv"

    num_layers: int = param(9, "conv layers explained by 'tail' and 'depth' (paper: VGG16's last nine)", ge=1)
    post_activation: bool = param(True, "hook conv -> [norm] -> [activation] outputs (Keras-like), not bare convs")
    weighting: Literal["guided", "gradcam"] = param(
        "guided", "map coefficient: 'guided' (INV code) or 'gradcam' (Grad-CAM Eq. 1)"
    )
    embedding: Literal["tsne", "opentsne", "pca"] = param(
        "tsne", "2-D embedding: 'tsne' (sklearn, the paper's), 'opentsne' or 'pca'"
    )
    seed: int = param(INV_SEED, "random state of PCA and t-SNE", ge=0, le=2**32 - 1)
    perplexity: float = param(30.0, "t-SNE perplexity (lowered to (n-1)/3 for small layers)", gt=0)
    max_pca_components: int = param(50, "PCA components kept before the embedding", ge=1)
    cluster_range: tuple[int, int] = param((3, 8), "smallest and largest k tried (silhouette)", ge=2)
    n_jobs: int | None = param(1, "layers clustered in parallel threads (same results); none = one per core", ge=1)

    def check(self) -> None:
        k_min, k_max = self.cluster_range
        if k_min > k_max:
            raise ParamError(f"inv.cluster_range: must be (k_min, k_max) with 2 <= k_min <= k_max, got {k_min, k_max}")
        if self.embedding == "opentsne":
            try:
                import openTSNE  # noqa: F401
            except ImportError as exc:
                raise ParamError("inv.embedding: 'opentsne' needs the openTSNE package: pip install openTSNE") from exc


class INV(BoundExplainer):
    """INV layer-wise explanations: per layer, clusters of feature maps weighted by generalised Grad-CAM.

    Args:
        model: the classifier (``nn.Module`` or :class:`~convlens.models.LoadedModel`).
        layers: ``"tail"`` (None: default; the last ``num_layers`` conv layers, the paper's choice),
            ``"depth"`` (``num_layers`` conv layers spread over the depth), ``"convs"`` (all of them; see
            :mod:`convlens.inv.layers`); otherwise a :func:`~convlens.core.layers.resolve_layers` spec
            (names, modules, ``"blocks"``, ``"last"``), explained in forward order whatever the order
            given. A named ``nn.Conv2d`` is replaced by the end of its conv -> norm -> activation chain
            when ``post_activation`` is true.
        score: the differentiated score (the paper: the logit).
        output_adapter, class_names: as for every convlens explainer.
        params: an :class:`INVParams`; or give its fields as keyword arguments (``INV(model, seed=1)``).
    """

    name: ClassVar[str] = "inv"
    paper: ClassVar[str] = (
        "Bianchi, De Santis, Tocchetti, Brambilla, INV: Interpretable Network Visualizations, IJCAI-24"
    )
    default_score: ClassVar[ScoreKind] = "logit"
    default_layers: ClassVar[str] = "tail"
    uses_layers: ClassVar[bool] = True
    Params: ClassVar[type[INVParams]] = INVParams
    config: INVParams

    def params(self) -> dict[str, Any]:
        """The knobs recorded in every result (``n_jobs`` is left out: it does not change results)."""
        spec = self.layer_spec
        layers = spec if isinstance(spec, str) else [s if isinstance(s, str) else type(s).__name__ for s in spec]
        recorded = {"layers": layers, "score": self.score} | self.config.as_dict()
        recorded.pop("n_jobs")
        return recorded

    # ------------------------------------------------------------------ layers
    def explained_layers(self, input_shape: Sequence[int]) -> list[ConvLayer]:
        """The conv layers INV explains for inputs of shape (C, H, W), in forward order (chosen once per shape).

        Not a saliency method's ``layers_for(x)``, which gives the hooked layer names for a batch."""
        return self.layer_choice(input_shape)[0]

    def layer_choice(self, input_shape: Sequence[int]) -> tuple[list[ConvLayer], dict[str, Any]]:
        """The explained layers and the record of how they were chosen (``layer_choice`` of the manifest)."""
        shape = tuple(int(s) for s in input_shape)
        spec = self.layer_spec
        key = (shape, spec if isinstance(spec, str) else tuple(map(id, spec)) if not isinstance(spec, nn.Module)
               else id(spec), self.config.post_activation, self.config.num_layers)
        return self.binding.cached_layers(key, lambda: self._choose_layers(shape))

    def _choose_layers(self, shape: tuple[int, ...]) -> tuple[list[ConvLayer], dict[str, Any]]:
        convs = find_conv_layers(self.model, shape, self.config.post_activation)
        spec, num_layers = self.layer_spec, self.config.num_layers
        choice: dict[str, Any] = {"rule": spec, "num_layers": num_layers, "conv_layers": len(convs)}
        if isinstance(spec, str) and spec in LAYER_RULES:
            if not convs:
                raise ValueError(f"{type(self.model).__name__} has no nn.Conv2d with a spatial output: INV needs a CNN")
            chosen = choose_conv_layers(convs, spec, num_layers)
            if spec != "convs" and len(convs) < num_layers:
                warnings.warn(
                    f"{type(self.model).__name__} has only {len(convs)} convolutional layers; INV explains all of "
                    f"them (num_layers={num_layers})",
                    UserWarning, stacklevel=4,
                )
        else:
            chosen = self._explicit_layers(convs, shape)
            choice |= {"rule": "explicit", "spec": [c.name for c in chosen]}
        logger.info("INV layers: %s", ", ".join(c.label for c in chosen))
        return chosen, choice

    def _explicit_layers(self, convs: list[ConvLayer], shape: tuple[int, ...]) -> list[ConvLayer]:
        by_conv = {c.conv: c for c in convs}
        by_name = {c.name: c for c in convs}
        chosen = []
        for name in resolve_layers(self.model, self.layer_spec, shape):
            if name in by_conv or name in by_name:
                chosen.append(by_conv.get(name) or by_name[name])
            else:
                chosen.append(ConvLayer(name, name, 0, (0, 0)))  # any other 4-D module: used as is
        order = describe_layers(self.model, shape)
        return sorted(dict.fromkeys(chosen), key=lambda c: order[c.name].order)  # forward order

    # ------------------------------------------------------------------ explain
    def explain(self, x: torch.Tensor, target: TargetSpec = None, image_id: str | None = None) -> InvExplanation:
        """Explain one image ``x`` (C, H, W) or (1, C, H, W) for ``target`` (None = predicted class).

        ``image_id``: SHA-256 hex digest naming the image (default: :func:`image_digest` of ``x``); its
        first 16 characters prefix every cluster id.
        """
        if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] != 1:
            raise ValueError(f"explain takes one image; use explain_batch for {x.shape[0]} images")
        ids = None if image_id is None else [image_id]
        return self.explain_batch(x, target, ids)[0]

    __call__ = explain

    def explain_batch(
        self, x: torch.Tensor, targets: TargetSpec = None, image_ids: Sequence[str] | None = None
    ) -> list[InvExplanation]:
        """Explain a batch (B, C, H, W) with one forward + one backward; one :class:`InvExplanation` each."""
        x = as_image_batch(x)
        if image_ids is not None and len(image_ids) != x.shape[0]:
            raise ValueError(f"got {len(image_ids)} image ids for {x.shape[0]} images")
        digests = [self._digest(x[b], image_ids[b] if image_ids is not None else None) for b in range(x.shape[0])]
        start = time.perf_counter()
        x = x.to(self.device, dtype=torch.float32)
        with explained_input(self.model, x):  # the layer search runs the model on an input of this shape
            layers, choice = self.layer_choice(x.shape[1:])
        logits, acts, grads, class_ids = self._forward(x, layers, targets)
        scores = self.binding.scores(logits, class_ids)
        predicted = logits.argmax(dim=1)
        t_fb = time.perf_counter() - start
        results = []
        for b, digest in enumerate(digests):
            t0 = time.perf_counter()
            inv_layers = self._explain_layers(layers, acts, grads, b, tuple(x.shape[-2:]), digest[:16])
            timings = {"forward_backward": t_fb}
            for step in ("weights", "pca", "embedding", "clustering", "maps"):
                timings[step] = float(sum(layer.timings.get(step, 0.0) for layer in inv_layers))
            timings["layers_wall"] = time.perf_counter() - t0
            timings["total"] = t_fb + timings["layers_wall"]
            target = int(class_ids[b])
            results.append(InvExplanation(
                image_id=digest[:16], image_sha256=digest, target=target, target_name=self.binding.class_name(target),
                score=float(scores[b]), predicted=int(predicted[b]), input_size=(int(x.shape[-2]), int(x.shape[-1])),
                layers=inv_layers, params=self.params(), timings=timings, versions=_versions(),
                model=self.binding.model_name, layer_choice=dict(choice),
            ))
        return results

    @staticmethod
    def _digest(image: torch.Tensor, given: str | None) -> str:
        digest = given if given is not None else image_digest(image)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{16,}", digest):
            raise ValueError(f"image id must be a hex digest (>= 16 characters), got {digest!r}")
        return digest.lower()

    def _forward(
        self, x: torch.Tensor, layers: list[ConvLayer], targets: TargetSpec
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """One forward + one backward of the target scores: logits, activations, gradients, class ids."""
        chosen: dict[str, torch.Tensor] = {}

        def score_fn(logits: torch.Tensor) -> torch.Tensor:
            chosen["ids"] = self.binding.targets(logits.detach(), targets)
            return self.binding.scores(logits, chosen["ids"])

        with eval_mode(self.model), explained_input(self.model, x):
            logits, acts, grads = forward_with_grads(
                self.model, x, [layer.name for layer in layers], score_fn, self.binding.output_adapter
            )
        for layer in layers:
            if acts[layer.name].ndim != 4:
                shape = tuple(acts[layer.name].shape)
                raise ValueError(f"layer {layer.name!r} outputs shape {shape}, not (B, K, h, w)")
        return logits, acts, grads, chosen["ids"]

    def _explain_layers(
        self, layers: list[ConvLayer], acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], b: int,
        size: tuple[int, int], image_id: str,
    ) -> list[InvLayer]:
        """Every layer of image ``b``, in ``n_jobs`` worker threads.

        PCA, t-SNE and clustering run on one BLAS and one OpenMP thread (the Barnes-Hut reduction's rounding
        depends on the thread count); ``n_jobs`` clusters *layers* in parallel threads instead, each limiting
        only its own OpenMP thread count while the calling thread holds the process-wide BLAS limit, so results
        are identical for every ``n_jobs``. The per-layer torch work runs on one torch thread: its tensors are
        tiny, and on a busy machine intra-op threads made each small op orders of magnitude slower."""
        jobs = [
            (i, layer, acts[layer.name][b : b + 1].float(), grads[layer.name][b : b + 1].float())
            for i, layer in enumerate(layers)
        ]
        with blas_single_thread(), limit_threads(1, required=True):  # process-wide, held until every worker ends
            limit_openmp = openmp_limiter()

            def run(job: tuple[int, ConvLayer, torch.Tensor, torch.Tensor]) -> InvLayer:
                with limit_openmp():  # this thread's own OpenMP thread count
                    return self._explain_layer(*job, size, image_id)

            workers = min(len(jobs), self.config.n_jobs or os.cpu_count() or 1)
            if workers <= 1:
                return [run(job) for job in jobs]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(run, jobs))

    def _explain_layer(
        self, index: int, conv_layer: ConvLayer, activations: torch.Tensor, gradients: torch.Tensor,
        size: tuple[int, int], image_id: str,
    ) -> InvLayer:
        """Weights, pruning, clusters and cluster maps of one layer of one image: activations/gradients (1, K, h, w)."""
        config = self.config
        t0 = time.perf_counter()
        alpha, percent = channel_weights(activations, gradients, config.weighting)
        weights = percent[0].double().cpu().numpy()
        num_channels, h, w = (int(s) for s in activations.shape[1:])
        threshold = prune_threshold(num_channels)
        kept = np.flatnonzero(weights > threshold)
        raw = activations[0].double().cpu()  # (K, h, w) raw activations
        layer_cam = torch.relu(torch.einsum("k,khw->hw", alpha[0].double().cpu(), raw))
        layer_map = minmax_normalize(upsample(layer_cam, size)).numpy()
        t1 = time.perf_counter()
        result = cluster_maps_unlimited(
            raw[kept].numpy(), config.seed, config.max_pca_components, config.perplexity, config.embedding,
            config.cluster_range,
        )
        t2 = time.perf_counter()
        clusters, weak, rank, weak_bound = _weighted_clusters(
            result, kept, weights, raw, size, image_id, conv_layer.name
        )
        timings = {
            "weights": t1 - t0, "pca": result.timings["pca"], "embedding": result.timings["embedding"],
            "clustering": result.timings["clustering"], "maps": time.perf_counter() - t2,
        }
        fallback = "no positive gradient in this layer: all weights are 0, no cluster" if weights.sum() == 0 \
            else result.fallback
        return InvLayer(
            index=index, name=conv_layer.name, conv=conv_layer.conv, num_channels=num_channels, feature_size=(h, w),
            alpha=alpha[0].double().cpu().numpy(), weights=weights, prune_threshold=threshold, kept_channels=kept,
            labels=rank[result.labels] if len(kept) else np.zeros(0, dtype=np.int64),
            embedding=result.embedding, n_clusters=result.n_clusters, silhouettes=result.silhouettes,
            pca_components=result.pca_components, perplexity=result.perplexity, weak_threshold=weak_bound,
            clusters=clusters, weak_clusters=weak, layer_map=layer_map.astype(np.float32), fallback=fallback,
            timings=timings, conv_position=conv_layer.position,
        )


def _weighted_clusters(
    result: ClusteringResult, kept: np.ndarray, weights: np.ndarray, raw: torch.Tensor, size: tuple[int, int],
    image_id: str, layer_name: str,
) -> tuple[list[InvCluster], list[InvCluster], np.ndarray, float]:
    """Cluster weights (percent of the whole layer), ranking (heaviest first, ties by first channel), weak
    removal and the weight-averaged cluster maps. Returns (kept clusters, weak clusters, rank of each
    clustering label, weak bound)."""
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
            id=f"{image_id}:{layer_name}:{position}",
        ))
    return clusters, weak, rank, weak_bound


def _versions() -> dict[str, str]:
    import platform

    import sklearn

    import convlens

    return {
        "convlens": convlens.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "scikit-learn": sklearn.__version__, "python": platform.python_version(),
    }


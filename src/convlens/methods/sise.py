"""SISE: Semantic Input Sampling for Explanation (Sattarzadeh, Sudhakar et al., AAAI-21, arXiv 2010.00672).

SISE explains a class by the input regions that the network's own feature maps outline, block by block:

1. layers: the last layer of every convolutional block (``layers="blocks"``), ordered low -> high level;
2. feature-map selection (Eqs. 6-8): one forward and one backward for all blocks and the whole batch; keep
   ``alpha_k > mu · max_k alpha_k`` and turn the kept maps into attribution masks ``Omega(A_k)`` (bilinear
   up-sampling to the input size, min-max normalisation);
3. attribution-based input sampling (Eqs. 9-12, :mod:`convlens.methods.sise_scoring`): every mask scored by
   a masked forward, ``V_b = sum_m Psi(x ⊙ m) m / (sum(m) + 1e-6)``;
4. fusion (Fig. 5): ``E <- (E + V_b) ⊙ G(V_b)`` from low to high level; the final map is ``E``.

Why it is built so: the masked forwards are the whole cost, so phases 1-2 run once per batch, and a kept
map that is spatially constant (its Omega is the zero mask, so ``C_m = 0``) is not scored: exact, and most
kept maps of a ReLU6 network are such. Where the paper and the authors' code differ (the fusion gate, the
baseline) the paper is the default and the code an option of :class:`SISEParams`; ``fast=True`` (not in
the paper) scores one medoid per group of similar masks. Costs and fidelity: BENCHMARKS.md, sections
``sise`` and ``localisation``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from convlens.core.engine import MaskedForwardEngine
from convlens.core.hooks import forward_with_grads
from convlens.core.layers import LayerSpec, describe_layers
from convlens.core.maps import minmax_exact
from convlens.core.params import MethodParams, param
from convlens.core.targets import ScoreKind, class_scores, resolve_targets
from convlens.core.threads import limit_threads
from convlens.methods.base import Explainer, MethodOutput
from convlens.methods.sise_scoring import BlockScores, score_fast, score_full
from convlens.numerics.otsu import code_otsu_threshold, otsu_threshold

__all__ = [
    "SISE",
    "BlockSelection",
    "FusionMode",
    "SISECascadeParams",
    "SISEImage",
    "SISEParams",
    "fuse_visualization_maps",
    "fusion_gate",
]

FusionMode = Literal["paper", "code", "simple"]


@dataclass(frozen=True)
class SISECascadeParams(MethodParams):
    """The knobs of SISE's phases 3-4 (masking, scoring, fusion), shared by SISE and Ada-SISE."""

    fusion: FusionMode = param("paper", "fusion gate G(V_b): paper's hard Otsu mask, authors' soft mask, or V_b")
    temperature: float = param(100.0, "sigmoid temperature of fusion='code' (authors' code: 100)", gt=0)
    bottleneck_tau: float = param(1.5, "tau of the authors' modified Otsu, fusion='code' (code: 1.5)", gt=0)
    baseline: Literal["zero", "mean", "blur"] | float = param(
        "zero", "what masked-out pixels become: zero, the image mean, a blurred copy, or a number"
    )
    blur_sigma: float = param(5.0, "Gaussian sigma in pixels of baseline='blur'", gt=0)
    fast: bool = param(False, "score one medoid per group of similar masks (approximate, fewer forwards)")
    fast_factor: float = param(8.0, "fast mode: groups per block = ceil(kept masks / fast_factor)", ge=1)
    fast_scores: Literal["gp", "medoid"] = param("gp", "fast mode: GP-interpolated or the medoid's score")


@dataclass(frozen=True)
class SISEParams(SISECascadeParams):
    """SISE's knobs: Eq. 7's threshold and the cascade options; defaults are the paper's."""

    method = "sise"
    mu: float = param(0.0, "Eq. 7 threshold: keep alpha_k > mu · max alpha (paper: 0; ablation 0.3-0.75)",
                      ge=0, le=1)


# ---------------------------------------------------------------------------------------------- phase 4
def fusion_gate(
    vis_map: torch.Tensor, fusion: FusionMode = "paper", temperature: float = 100.0, tau: float = 1.5
) -> tuple[torch.Tensor, float | None]:
    """The mask ``G(V_b)`` a fusion block multiplies by, and the threshold it used (None for simple).

    ``paper``: ``1[V >= Otsu(V)]`` (256 bins over [min, max] as ``skimage.filters.threshold_otsu``);
    ``code``: ``sigmoid(temperature (V - t'))`` with the authors' modified Otsu; ``simple``: ``V``.
    """
    if fusion == "paper":
        threshold = otsu_threshold(vis_map, bins=256)
        return (vis_map >= threshold).to(vis_map.dtype), threshold
    if fusion == "code":
        threshold = code_otsu_threshold(vis_map, bins=256, tau=tau)
        return torch.sigmoid(temperature * (vis_map - threshold)), threshold
    if fusion == "simple":
        return vis_map, None
    raise ValueError(f"unknown fusion {fusion!r}; choose paper, code or simple")


def fuse_visualization_maps(
    vis_maps: Sequence[torch.Tensor], fusion: FusionMode = "paper", temperature: float = 100.0, tau: float = 1.5
) -> tuple[torch.Tensor, list[torch.Tensor], list[float | None]]:
    """Cascaded fusion (the paper's fusion module, Fig. 5): ``E_1 = V_1``, ``E_b = (E_{b-1} + V_b) ⊙ G(V_b)``.

    Args:
        vis_maps: (H, W) visualisation maps in [0, 1], ordered low-level -> high-level.

    Returns:
        the final map ``E_B``, the intermediate maps ``E_2 .. E_B``, and each block's gate threshold.
    """
    if not vis_maps:
        raise ValueError("fusion needs at least one visualisation map")
    fused = vis_maps[0].clone()
    intermediates: list[torch.Tensor] = []
    thresholds: list[float | None] = []
    for vis_map in vis_maps[1:]:
        gate, threshold = fusion_gate(vis_map, fusion, temperature, tau)
        fused = (fused + vis_map) * gate
        intermediates.append(fused)
        thresholds.append(threshold)
    return fused, intermediates, thresholds


# ---------------------------------------------------------------------------------------------- results
@dataclass
class BlockSelection:
    """Phase 2 for one image and one block: which feature maps become attribution masks.

    Attributes:
        layer: module name.
        kept: (K_kept,) channel indices kept by Eq. 7.
        scored: the kept channels whose map is not spatially constant — the masks that are scored
            (a constant map's Omega is the zero mask, whose contribution ``C_m`` is exactly 0).
        activations: (K_scored, h, w) the feature maps of ``scored`` (before Omega).
        candidates: number of channels of the layer.
        alpha: (N,) spatial mean gradient of every channel (Eq. 6).
        threshold: the selection threshold on alpha (``mu · beta`` for SISE, ``tau_l · beta`` for
            Ada-SISE); ``None`` when nothing can be kept (``beta <= 0``).
        relative_threshold: the threshold relative to ``beta`` (``mu``, or Ada-SISE's ``tau_l``).
    """

    layer: str
    kept: torch.Tensor
    scored: torch.Tensor
    activations: torch.Tensor
    candidates: int
    alpha: torch.Tensor
    threshold: float | None
    relative_threshold: float | None

    @property
    def n_kept(self) -> int:
        return int(self.kept.numel())

    @property
    def n_scored(self) -> int:
        return int(self.scored.numel())


@dataclass
class SISEImage:
    """SISE's phases 2-4 for one image.

    Attributes:
        blocks: the phase-2 selection of every block, low-level -> high-level.
        scores: phase 3: un-normalised ``V_b``, mask scores and the forwards spent.
        vis_maps: (blocks, H, W) the min-max normalised ``V_b``.
        final: (H, W) the explanation ``E_B``.
        fused: intermediate ``E_b`` by layer (every informative block after the first).
        fusion_thresholds: the gate threshold by layer (same blocks as ``fused``).
        skipped: layers left out of the cascade (no scored mask or a constant ``V_b``).
    """

    blocks: list[BlockSelection]
    scores: BlockScores
    vis_maps: torch.Tensor
    final: torch.Tensor
    fused: dict[str, torch.Tensor]
    fusion_thresholds: dict[str, float | None]
    skipped: list[str]


# ---------------------------------------------------------------------------------------------- the method
class SISE(Explainer):
    """SISE (AAAI-21): block-wise attribution masks from feature maps with positive mean gradient,
    scored by masked forwards (Eqs. 9-12) and fused low -> high level (see the module docstring).

    The score Psi defaults to the softmax probability (the paper's Keras models output probabilities;
    ``score="sigmoid"`` for multi-label models). A block with no scored mask or a constant ``V_b`` carries
    no information: it is left out of the cascade (``extras["skipped_blocks"]``) and its ``V_b`` is zeros.

    Args:
        model: the classifier.
        keep_mask_scores: put every mask's score ``Psi(x ⊙ m)`` in ``extras["mask_scores"][layer]`` (per
            image, in the order of :attr:`BlockSelection.scored`; fast mode: the scores it used).
        **kwargs: the knobs of :class:`SISEParams` (``mu``, ``fusion``, ``baseline``, ``fast``, ...) and
            :class:`~convlens.methods.base.Explainer`'s arguments: ``layers`` (default ``"blocks"``),
            ``score`` (default ``"softmax"``), ``batch_size``, ``output_adapter``, ``class_names``, ``params``.
    """

    name: ClassVar[str] = "sise"
    paper: ClassVar[str] = "Sattarzadeh, Sudhakar et al., SISE, AAAI 2021"
    default_layers: ClassVar[LayerSpec] = "blocks"
    default_score: ClassVar[ScoreKind] = "softmax"
    Params: ClassVar[type[MethodParams]] = SISEParams
    config: SISEParams

    def __init__(self, model: Any, keep_mask_scores: bool = False, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.keep_mask_scores = bool(keep_mask_scores)

    def params(self) -> dict[str, Any]:
        """Recorded as ``score, batch_size, layers, mu, <cascade options>`` (the layers resolved when explicit)."""
        recorded = super().params()
        head = {key: recorded.pop(key) for key in ("score", "batch_size")}
        head["layers"] = self.layer_spec if isinstance(self.layer_spec, str) else list(self._layers or [])
        if "mu" in recorded:
            head["mu"] = recorded.pop("mu")
        return head | recorded

    # ------------------------------------------------------------------ phase 1
    def layers_for(self, x: torch.Tensor) -> list[str]:
        """Phase 1: the layers, de-duplicated and ordered low-level -> high-level (execution order)."""
        shape = tuple(x.shape[1:])

        def ordered() -> list[str]:
            layers = list(dict.fromkeys(super(SISE, self).layers_for(x)))
            if not (isinstance(self.layer_spec, str) and self.layer_spec in ("blocks", "last")) and len(layers) > 1:
                order = describe_layers(self.model, shape)
                layers.sort(key=lambda name: order[name].order if name in order else math.inf)
            return layers

        self._layers = self.binding.cached_layers(("execution order", shape), ordered)
        return self._layers

    # ------------------------------------------------------------------ phase 2
    def select_channels(self, alpha: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """Eqs. 7-8: indices with ``alpha_k > mu · beta``, ``beta = max alpha`` (arg-max always kept when
        ``beta > 0``: nothing changes for ``mu < 1``, and ``mu = 1`` keeps that channel instead of none), and
        the relative threshold used (``mu``; None when ``beta <= 0``). ``alpha`` is the spatial mean gradient
        (Eq. 6 writes a sum: the same order, and the threshold is relative)."""
        mu = self.config.mu
        beta = float(alpha.max())
        if beta <= 0:  # no channel raises the score: no attribution mask (Eq. 7 with mu=0 keeps none either)
            return torch.empty(0, dtype=torch.long, device=alpha.device), None
        keep = alpha > mu * beta
        keep[int(alpha.argmax())] = True
        return torch.nonzero(keep)[:, 0], mu

    def _select_block(self, name: str, activation: torch.Tensor, gradient: torch.Tensor) -> BlockSelection:
        """Phase 2 of one image's (K, h, w) activation and gradient of layer ``name``."""
        alpha = gradient.float().mean(dim=(1, 2))
        kept, relative = self.select_channels(alpha)
        beta = float(alpha.max())
        maps = activation.float()[kept]
        flat = maps.flatten(1)
        varying = flat.amax(1) > flat.amin(1)
        return BlockSelection(
            layer=name,
            kept=kept,
            scored=kept[varying],
            activations=maps[varying],
            candidates=int(alpha.numel()),
            alpha=alpha,
            threshold=None if relative is None else relative * beta,
            relative_threshold=relative,
        )

    @limit_threads()
    def _select(
        self, acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], layers: Sequence[str]
    ) -> list[list[BlockSelection]]:
        for name in layers:
            if acts[name].ndim != 4:
                raise ValueError(f"layer {name!r} output has shape {tuple(acts[name].shape)}: SISE needs 4-D maps")
        batch = next(iter(acts.values())).shape[0]
        return [[self._select_block(name, acts[name][b], grads[name][b]) for name in layers] for b in range(batch)]

    def select_feature_maps(self, x: torch.Tensor, targets: Any = None) -> list[list[BlockSelection]]:
        """Phases 1-2 only (one forward + one backward): per image, per block, the kept feature maps.

        Tells what an explanation will cost (``sum n_scored`` masked forwards per image) without running it.
        """
        if x.ndim == 3:
            x = x[None]
        x = x.to(self.device, dtype=torch.float32)
        class_ids = resolve_targets(self.logits(x), targets, self.class_names)
        layers = self.layers_for(x)
        _, acts, grads = forward_with_grads(
            self.model, x, layers, lambda lg: class_scores(lg, class_ids, self.score), self.output_adapter
        )
        return self._select(acts, grads, layers)

    # ------------------------------------------------------------------ phase 3
    def baseline_for(self, image: torch.Tensor) -> torch.Tensor | float:
        """What masked-out pixels of ``image`` (C, H, W) become; the masked input is ``b + (x - b) ⊙ m``.

        ``"zero"`` (default) multiplies the *preprocessed* tensor by the mask, as the authors' code does (0 is
        the dataset mean for mean/std-normalised inputs); ``"mean"`` the image's per-channel mean; ``"blur"`` a
        Gaussian-blurred copy (``blur_sigma`` pixels); a number a constant in input space."""
        baseline, sigma = self.config.baseline, self.config.blur_sigma
        if isinstance(baseline, float):
            return baseline
        if baseline == "zero":
            return 0.0
        if baseline == "mean":
            return image.mean(dim=(1, 2), keepdim=True)
        from torchvision.transforms.functional import gaussian_blur

        limit = 2 * min(image.shape[-2:]) - 1  # reflect padding needs kernel // 2 < size
        kernel = min(2 * math.ceil(3 * sigma) + 1, limit if limit % 2 else limit - 1)
        return gaussian_blur(image, [kernel, kernel], [sigma, sigma])

    def _score(self, engine: MaskedForwardEngine, image: torch.Tensor, class_id: torch.Tensor,
               blocks: list[BlockSelection], size: tuple[int, int]) -> BlockScores:
        """Phase 3 of one image: every kept mask scored (the paper), or fast mode's approximation."""
        activations = [block.activations for block in blocks]
        baseline = self.baseline_for(image)
        if self.config.fast:
            return score_fast(engine, image, class_id, activations, size, baseline, self.batch_size,
                              self.config.fast_factor, self.config.fast_scores)
        return score_full(engine, image, class_id, activations, size, baseline, self.batch_size)

    # ------------------------------------------------------------------ phase 4
    @limit_threads()
    def _fuse(self, blocks: list[BlockSelection], scores: BlockScores) -> SISEImage:
        """Phase 4 of one image: normalise every ``V_b`` and fuse the informative blocks low -> high.

        The min-max normalisation is exact (no epsilon: ``V_b`` sums are tiny per mask, an epsilon would
        distort them)."""
        normalised = minmax_exact(scores.vis_maps)
        informative = [i for i, block in enumerate(blocks) if block.n_scored and bool(normalised[i].max() > 0)]
        fused: dict[str, torch.Tensor] = {}
        thresholds: dict[str, float | None] = {}
        if informative:
            final, intermediates, gate_thresholds = fuse_visualization_maps(
                [normalised[i] for i in informative], self.config.fusion, self.config.temperature,
                self.config.bottleneck_tau,
            )
            for i, fused_map, threshold in zip(informative[1:], intermediates, gate_thresholds, strict=True):
                fused[blocks[i].layer] = fused_map
                thresholds[blocks[i].layer] = threshold
        else:
            final = torch.zeros(scores.vis_maps.shape[-2:], device=scores.vis_maps.device)
        skipped = [block.layer for i, block in enumerate(blocks) if i not in informative]
        return SISEImage(blocks, scores, normalised, final, fused, thresholds, skipped)

    # ------------------------------------------------------------------ all phases
    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        layers = self.layers_for(x)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        t0 = time.perf_counter()
        _, acts, grads = forward_with_grads(
            self.model, x, layers, lambda lg: class_scores(lg, class_ids, self.score), self.output_adapter
        )
        t1 = time.perf_counter()
        selections = self._select(acts, grads, layers)
        del acts, grads
        t2 = time.perf_counter()
        engine = MaskedForwardEngine(
            self.model, score=self.score, batch_size=self.batch_size, output_adapter=self.output_adapter
        )
        images: list[SISEImage] = []
        fusion_time = 0.0
        for b, blocks in enumerate(selections):
            scores = self._score(engine, x[b], class_ids[b], blocks, size)
            t_fuse = time.perf_counter()
            images.append(self._fuse(blocks, scores))
            fusion_time += time.perf_counter() - t_fuse
        t3 = time.perf_counter()
        return MethodOutput(
            maps=torch.stack([image.final for image in images]),
            layer_maps=self._layer_maps(images, layers, size, x.device),
            extras=self._extras(images, layers),
            forward_passes=x.shape[0] + engine.forward_passes,
            backward_passes=x.shape[0],
            timings={
                "forward_backward": t1 - t0,
                "selection": t2 - t1,
                "masked_forwards": t3 - t2 - fusion_time,
                "fusion": fusion_time,
            },
        )

    @staticmethod
    def _layer_maps(images: list[SISEImage], layers: list[str], size: tuple[int, int], device: torch.device
                    ) -> dict[str, torch.Tensor]:
        """Every block's normalised ``V_b`` by layer name, and each fused intermediate as ``fused@<layer>``."""
        layer_maps = {
            name: torch.stack([image.vis_maps[i] for image in images]).detach().cpu() for i, name in enumerate(layers)
        }
        for name in layers[1:]:
            if any(name in image.fused for image in images):
                layer_maps[f"fused@{name}"] = torch.stack(
                    [image.fused.get(name, torch.zeros(size, device=device)) for image in images]
                ).detach().cpu()
        return layer_maps

    def _extras(self, images: list[SISEImage], layers: list[str]) -> dict[str, Any]:
        """Per layer and image: kept / candidate / constant masks and thresholds; per image: skipped blocks,
        masked forwards (and mask scores, fast mode's savings); the fusion settings and baseline."""

        def per_layer(value: Any) -> dict[str, list[Any]]:
            return {name: [value(image, i, name) for image in images] for i, name in enumerate(layers)}

        extras: dict[str, Any] = {
            "kept_masks": per_layer(lambda image, i, _: image.blocks[i].n_kept),
            "candidates": per_layer(lambda image, i, _: image.blocks[i].candidates),
            "constant_masks": per_layer(lambda image, i, _: image.blocks[i].n_kept - image.blocks[i].n_scored),
            "selection_threshold": per_layer(lambda image, i, _: image.blocks[i].threshold),
            "relative_threshold": per_layer(lambda image, i, _: image.blocks[i].relative_threshold),
            "fusion_threshold": per_layer(lambda image, _, name: image.fusion_thresholds.get(name)),
            "skipped_blocks": [image.skipped for image in images],
            "masked_forwards": [image.scores.forwards for image in images],
        }
        if self.keep_mask_scores:
            extras["mask_scores"] = per_layer(lambda image, i, _: image.scores.mask_scores[i].tolist())
        if self.config.fast:
            reports = [image.scores.fast or {} for image in images]
            extras["fast"] = {key: [report[key] for report in reports] for key in ("groups", "forwards_saved")}
        extras["fusion"] = {"mode": self.config.fusion, "temperature": self.config.temperature,
                            "bottleneck_tau": self.config.bottleneck_tau}
        extras["baseline"] = self.config.baseline
        return extras


"""SISE: Semantic Input Sampling for Explanation (Sattarzadeh, Sudhakar et al., AAAI-21, arXiv 2010.00672).

Four phases:

1. **Layer selection** — the last layer of every convolutional block (``layers="blocks"``, the core's
   discovery: ResNet-50 -> ``relu, layer1..layer4``, 3904 feature maps); any explicit list works and is
   ordered by execution (low-level -> high-level), which is the order the fusion cascade needs.
2. **Feature-map selection** (Eqs. 6-8) — ONE forward and ONE backward for all selected layers and the
   whole batch; ``alpha_k`` = spatial mean of dPsi/dA_k (Eq. 6 writes a sum: same ordering, and the
   threshold is relative); keep ``alpha_k > mu * max_k alpha_k`` (Eqs. 7-8, ``mu = 0`` default). Kept
   maps become attribution masks ``Omega(A_k)``: bilinear up-sampling to the input size and per-mask
   min-max normalisation ``(m - min) / (max(m - min) + 1e-6)``.
3. **Attribution-based input sampling** (Eqs. 9-12) — every kept mask is scored, ``Psi(x ⊙ m)``, by the
   core's masked-forward engine; ``C_m = m / (sum(m) + 1e-6)`` (Eq. 11, the code's epsilon) and the
   block's visualisation map ``V_b = sum_m Psi(x ⊙ m) C_m`` (Eq. 12, a sum as in the code — the mean
   differs by a constant that the min-max normalisation of ``V_b`` removes). The scoring itself, full and
   fast, is :mod:`convlens.methods.sise_scoring`.
4. **Fusion** (the paper's fusion module, Fig. 5) — a cascade from low-level to high-level blocks,
   ``E <- (E + V_b) ⊙ G(V_b)``.

The final map is ``E`` (raw, not re-normalised, as in the authors' code).

Choices where the sources are silent or disagree (all exposed as :class:`SISEParams`):

* ``fusion="paper"`` (default): ``G(V) = 1[V >= t]`` with ``t`` = Otsu's threshold of V over a 256-bin
  histogram (the paper's hard binary mask; :func:`convlens.numerics.otsu.otsu_threshold`, equal to
  ``skimage.filters.threshold_otsu``). ``fusion="code"``: the authors' soft mask
  ``sigmoid(100 (V - t'))`` with their modified Otsu on ``round(256 V)`` and the ``tau = 1.5``
  "bottleneck" rule (:func:`convlens.numerics.otsu.code_otsu_threshold`). ``fusion="simple"``: ``G(V) = V``.
* The score Psi defaults to the softmax probability (the Keras models of the paper output
  probabilities); pass ``score="sigmoid"`` for multi-label models or ``score="logit"``.
* Baseline (what masked-out pixels become): ``"zero"`` (default) multiplies the *preprocessed* tensor
  by the mask, as the authors' code does (0 is the dataset mean for mean/std-normalised inputs);
  ``"mean"`` uses the per-channel mean of the image; ``"blur"`` a Gaussian-blurred copy
  (``blur_sigma`` pixels); a number is a constant in input space. The masked input is
  ``baseline + (x - baseline) ⊙ m``.
* The arg-max channel of a block is always kept when ``max alpha > 0``: for ``mu < 1`` this changes
  nothing (it already satisfies Eq. 7); for ``mu = 1`` it keeps exactly that channel instead of an
  empty set.
* A kept feature map that is spatially constant (an all-zero ReLU/ReLU6 channel, say) becomes the
  zero mask under Omega, so ``C_m = 0`` and its score cannot change ``V_b``: it is not scored. This is
  exact, and large: on EfficientNet-Lite0's last block (ReLU6 output) about 400 of the ~630 maps kept
  for a photo are all zeros. ``extras["kept_masks"]`` counts Eq. 7's set, ``extras["constant_masks"]``
  the maps skipped this way, ``extras["masked_forwards"]`` the forwards spent.
* A block with no scored mask (all ``alpha <= 0``) or a constant ``V_b`` carries no information and is
  left out of the cascade (listed in ``extras["skipped_blocks"]``); its ``V_b`` is reported as zeros.
* ``V_b`` is min-max normalised exactly (no epsilon: ``V_b`` sums are ~1e-5 per mask, an epsilon
  would distort them).

``fast=True`` trades fidelity for time (not in the paper; :func:`convlens.methods.sise_scoring.score_fast`):
within each block the kept masks are clustered by cosine similarity into ``ceil(K / fast_factor)`` groups,
only each group's medoid is scored, and every other mask gets a score interpolated by Gaussian-process
regression on 7x7 down-sampled masks (``fast_scores="gp"``; ``"medoid"``: its medoid's) and contributes
with its own ``C_m``. The default ``fast_factor = 4`` runs a quarter of full SISE's masked forwards, so the
wall time is at least 3x shorter once phase 1-2 and the mask generation (shared by both) are paid; a third
(``fast_factor = 3``) would leave less than 3x. The price is the map's fidelity, not its localisation. On
the real-photo set with EfficientNet-Lite0 (BENCHMARKS.md, section ``localisation``: 11 hand-boxed
objects) fast mode ran 116 instead of 452 forwards per image in 6.1 instead of 26.5 s, with an
energy-based pointing game of 88.3 % against full SISE's 88.1 % (Bbox 74.0 vs 70.6 %, pointing game
equal), but its final map correlates with full SISE's at r = 0.87 on average (0.66 at worst): the
hard-Otsu cascade of ``fusion="paper"`` amplifies score errors (BENCHMARKS.md, section ``sise``: noise on
the scores alone lowers the final map's r most with the paper's fusion); ``fusion="code"``/``"simple"``
keep it closer (section ``sise``: r 0.87-1.0 and 0.97-1.0 against 0.66-0.99 on three photos, fast mode
timed at 3.8-4.0x on EfficientNet-Lite0 and ResNet-50). Spending the saved forwards
elsewhere did not help on that set: farthest-point or random subsets, log-linear or log/sqrt-space
surrogates, a GP shared across blocks or more forwards for the last block all correlated worse or equal.
Fast mode keeps the scores it used in ``extras["mask_scores"]`` and reports ``extras["fast"]`` (groups,
forwards saved).
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
        ``beta > 0``), and the relative threshold used (``mu``; None when ``beta <= 0``)."""
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
        """What masked-out pixels of ``image`` (C, H, W) become."""
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
        """Phase 4 of one image: normalise every ``V_b`` and fuse the informative blocks low -> high."""
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


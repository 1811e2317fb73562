"""SISE: Semantic Input Sampling for Explanation (Sattarzadeh, Sudhakar et al., AAAI-21, arXiv 2010.00672).

Four phases (spec ``methods.md`` section 1):

1. **Layer selection** — the last layer of every convolutional block (``layers="blocks"``, the core's
   discovery: ResNet-50 -> ``relu, layer1..layer4``, 3904 feature maps); any explicit list works and is
   ordered by execution (low-level -> high-level), which is the order the fusion cascade needs.
2. **Feature-map selection** (Eqs. 6-8) — ONE forward and ONE backward for all selected layers and the
   whole batch; ``alpha_k`` = spatial mean of dPsi/dA_k (Eq. 6 writes a sum: same ordering, and the
   threshold is relative); keep ``alpha_k > mu * max_k alpha_k`` (Eq. 7-8, ``mu = 0`` default). Kept
   maps become attribution masks ``Omega(A_k)``: bilinear up-sampling to the input size and per-mask
   min-max normalisation ``(m - min) / (max(m - min) + 1e-6)``.
3. **Attribution-based input sampling** (Eqs. 9-12) — every kept mask is scored, ``Psi(x ⊙ m)``, by the
   core's masked-forward engine; ``C_m = m / (sum(m) + 1e-6)`` (Eq. 11, the code's epsilon) and the
   block's visualisation map ``V_b = sum_m Psi(x ⊙ m) C_m`` (Eq. 12, a sum as in the code — the mean
   differs by a constant that the min-max normalisation of ``V_b`` removes).
4. **Fusion** — a cascade from low-level to high-level blocks, ``E <- (E + V_b) ⊙ G(V_b)``.

The final map is ``E`` (raw, not re-normalised, as in the authors' code).

Choices where the sources are silent or disagree (all exposed as options):

* ``fusion="paper"`` (default): ``G(V) = 1[V >= t]`` with ``t`` = Otsu's threshold of V over a 256-bin
  histogram (the paper's hard binary mask; :func:`convlens.core.maps.otsu_threshold`, equal to
  ``skimage.filters.threshold_otsu``). ``fusion="code"``: the authors' soft mask
  ``sigmoid(100 (V - t'))`` with their modified Otsu on ``round(256 V)`` and the ``tau = 1.5``
  "bottleneck" rule (:func:`code_otsu_threshold`). ``fusion="simple"``: ``G(V) = V``.
* The score Psi defaults to the softmax probability (the Keras models of the paper output
  probabilities); pass ``score="sigmoid"`` for multi-label models or ``score="logit"``.
* Baseline (what masked-out pixels become): ``"zero"`` (default) multiplies the *preprocessed* tensor
  by the mask, as the authors' code does (0 is the dataset mean for mean/std-normalised inputs);
  ``"mean"`` uses the per-channel mean of the image; ``"blur"`` a Gaussian-blurred copy
  (``blur_sigma`` pixels); a number is a constant in input space. The masked input is
  ``baseline + (x - baseline) ⊙ m``.
* The arg-max channel of a block is always kept when ``max alpha > 0``: for ``mu < 1`` this changes
  nothing (it already satisfies Eq. 7); for ``mu >= 1`` it keeps exactly that channel instead of an
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

``fast=True`` cuts the masked forwards further, approximately: within each block the scored masks are
grouped by average-linkage clustering on cosine distance (:func:`group_masks`) into
``ceil(K / fast_factor)`` groups and only each group's medoid goes through the model. Every other mask
gets an interpolated score — Gaussian-process regression from all the block's scored medoids on 7x7
down-sampled masks (:func:`interpolate_scores`, ``fast_scores="gp"``) or simply its medoid's score
(``fast_scores="medoid"``) — and contributes with its own ``C_m``. Measured on four photos with
EfficientNet-Lite0 (BENCHMARKS.md, section ``sise``): the hard-Otsu cascade of ``fusion="paper"``
amplifies score errors (a 0.01 noise on the scores alone can drop the final map's Pearson r to 0.86),
so fast mode keeps the map well only with ``fusion="code"``/``"simple"``. ``extras["fast"]`` reports
the forwards saved.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from convlens.core.engine import MaskedForwardEngine
from convlens.core.hooks import forward_with_grads
from convlens.core.layers import LayerSpec, describe_layers
from convlens.core.maps import minmax_normalize, otsu_threshold, upsample
from convlens.core.targets import ScoreKind, class_scores, resolve_targets
from convlens.methods.base import Explainer, MethodOutput

__all__ = [
    "SISE",
    "BlockSelection",
    "FusionMode",
    "code_otsu_threshold",
    "fuse_visualization_maps",
    "fusion_gate",
    "group_masks",
    "interpolate_scores",
    "mask_features",
    "minmax_exact",
]

FusionMode = Literal["paper", "code", "simple"]
FUSION_MODES: tuple[str, ...] = ("paper", "code", "simple")
BASELINES: tuple[str, ...] = ("zero", "mean", "blur")
MASK_EPS = 1e-6  # Omega's min-max epsilon and C_m's denominator epsilon (authors' code: 10e-7)


# ---------------------------------------------------------------------------------------------- map helpers
def minmax_exact(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise a (..., H, W) map to [0, 1] without epsilon; a constant map becomes zeros.

    The normalisation of each visualisation map ``V_b`` (authors' code, ``visualize_layers``).
    """
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return out.view_as(maps)


def code_otsu_threshold(vis_map: torch.Tensor, bins: int = 256, tau: float = 1.5) -> float:
    """The authors' modified Otsu threshold of a [0, 1] map (spec 1.7; code ``otsu``).

    1. ``q = round(bins · V)``; histogram of q with ``bins`` unit bins over ``[0, bins]`` (the last bin
       also holds ``q = bins``, as ``numpy.histogram`` does); class means use the bin indices.
    2. For ``j = 1 .. bins-1``: between-class variance ``w0 w1 (u0 - u1)^2`` of the split ``bin < j``.
    3. ``t`` = the arg-max (first one; an empty class gives NaN, and like ``numpy.argmax`` the first NaN
       wins — it never happens for a min-max normalised map).
    4. Bottleneck rule: if fewer than 10 % of the pixels fall in bins ``>= round(tau · t)`` (Python's
       round, half to even) the threshold is ``tau · t / bins``, else ``t / bins``.
    """
    q = torch.round(vis_map.detach().double().flatten() * bins)
    q = q[(q >= 0) & (q <= bins)]
    hist = torch.bincount(q.long().clamp_max(bins - 1), minlength=bins).double()
    levels = torch.arange(bins, dtype=torch.float64)
    total = hist.sum()
    w0 = torch.cumsum(hist, 0)[:-1]  # j = 1..bins-1: pixels in bins < j
    w1 = total - w0
    s0 = torch.cumsum(hist * levels, 0)[:-1]
    u0 = s0 / w0
    u1 = ((hist * levels).sum() - s0) / w1
    variance = torch.cat([torch.zeros(1, dtype=torch.float64), w0 * w1 * (u0 - u1) ** 2])
    nan = torch.isnan(variance)
    t = int(torch.nonzero(nan)[0]) if bool(nan.any()) else int(torch.argmax(variance))
    k = round(t * tau)
    if float(hist[int(k) :].sum()) < 0.1 * float(total):
        return t * tau / bins
    return t / bins


def fusion_gate(
    vis_map: torch.Tensor, fusion: FusionMode = "paper", temperature: float = 100.0, tau: float = 1.5
) -> tuple[torch.Tensor, float | None]:
    """The mask ``G(V_b)`` a fusion block multiplies by, and the threshold it used (None for simple).

    ``paper``: ``1[V >= Otsu(V)]`` (256 bins over [min, max] as ``skimage.filters.threshold_otsu``);
    ``code``: ``sigmoid(temperature (V - t'))`` with :func:`code_otsu_threshold`; ``simple``: ``V``.
    """
    if fusion == "paper":
        threshold = otsu_threshold(vis_map, bins=256)
        return (vis_map >= threshold).to(vis_map.dtype), threshold
    if fusion == "code":
        threshold = code_otsu_threshold(vis_map, bins=256, tau=tau)
        return torch.sigmoid(temperature * (vis_map - threshold)), threshold
    if fusion == "simple":
        return vis_map, None
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSION_MODES}")


def fuse_visualization_maps(
    vis_maps: Sequence[torch.Tensor], fusion: FusionMode = "paper", temperature: float = 100.0, tau: float = 1.5
) -> tuple[torch.Tensor, list[torch.Tensor], list[float | None]]:
    """Cascaded fusion (paper "Fusion Module", Fig. 5): ``E_1 = V_1``, ``E_b = (E_{b-1} + V_b) ⊙ G(V_b)``.

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


def group_masks(maps: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group near-duplicate masks: average-linkage clustering on cosine distance (scipy).

    Args:
        maps: (K, h, w) kept feature maps of one block (at the layer's resolution).
        n_groups: number of groups (clamped to [1, K]).

    Returns:
        ``labels`` (K,) group of each map (0 .. G-1) and ``medoids`` (G,) the index of each group's
        representative: the member with the highest summed cosine similarity to its group.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n_maps = maps.shape[0]
    n_groups = max(1, min(int(n_groups), n_maps))
    if n_groups == n_maps:
        index = torch.arange(n_maps)
        return index, index
    vectors = minmax_normalize(maps.detach().double().cpu(), eps=MASK_EPS).flatten(1)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a constant map -> 0 vector
    similarity = vectors @ vectors.T
    if n_groups == 1:
        labels = torch.zeros(n_maps, dtype=torch.long)
    else:
        distance = (1 - similarity).clamp_min(0).fill_diagonal_(0)
        tree = linkage(squareform(distance.numpy(), checks=False), method="average")
        labels = torch.as_tensor(fcluster(tree, t=n_groups, criterion="maxclust"), dtype=torch.long) - 1
        _, labels = torch.unique(labels, return_inverse=True)
    medoids = []
    for group in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == group)[:, 0]
        medoids.append(int(members[similarity[members][:, members].sum(1).argmax()]))
    return labels, torch.as_tensor(medoids, dtype=torch.long)


def mask_features(maps: torch.Tensor, resolution: int = 7) -> torch.Tensor:
    """(K, h, w) feature maps -> (K, r*r) min-max normalised maps average-pooled to at most r x r: where
    fast mode compares masks (a mask's score depends on its coarse layout, not on pixel detail)."""
    import torch.nn.functional as F

    normalised = minmax_normalize(maps.detach().double().cpu(), eps=MASK_EPS)
    out = (min(resolution, maps.shape[-2]), min(resolution, maps.shape[-1]))
    return F.adaptive_avg_pool2d(normalised[:, None], out).flatten(1)


def interpolate_scores(
    features: torch.Tensor, scored: torch.Tensor, scores: torch.Tensor, noise: float = 1e-3
) -> torch.Tensor:
    """Scores of all K masks from the scores of a subset: Gaussian-process regression (posterior mean).

    Squared-exponential kernel ``k(a, b) = exp(-|a - b|^2 / (2 l^2))`` on :func:`mask_features`,
    length-scale ``l`` = median distance between the scored masks, constant prior mean = their mean
    score, ``noise`` added to the kernel diagonal; the scored masks keep their exact scores.

    Args:
        features: (K, D) mask features.
        scored: (G,) indices of the scored masks.
        scores: (G,) their scores.
    """
    x_all = features.double()
    x_scored = x_all[scored]
    y = scores.detach().double().cpu()
    prediction = torch.full((x_all.shape[0],), float(y.mean()), dtype=torch.float64)
    distances = torch.cdist(x_scored, x_scored)
    positive = distances[distances > 0]
    if positive.numel():
        length = torch.median(positive)
        gram = torch.exp(-(distances**2) / (2 * length**2)) + noise * torch.eye(len(y), dtype=torch.float64)
        weights = torch.linalg.solve(gram, y - y.mean())
        cross = torch.exp(-(torch.cdist(x_all, x_scored) ** 2) / (2 * length**2))
        prediction = prediction + cross @ weights
    prediction[scored] = y
    return prediction.to(scores.dtype)


# ---------------------------------------------------------------------------------------------- phase 2 result
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


# ---------------------------------------------------------------------------------------------- the method
class SISE(Explainer):
    """SISE (AAAI-21): block-wise attribution masks from feature maps with positive mean gradient,
    scored by masked forwards (Eqs. 9-12) and fused low -> high level (see the module docstring).

    Args:
        model: the classifier.
        mu: Eq. 7 threshold ``alpha_k > mu · max(alpha)``, ``mu >= 0`` (paper default 0; ablation 0.3,
            0.5, 0.75).
        fusion: ``"paper"`` (hard Otsu mask), ``"code"`` (authors' soft Otsu mask) or ``"simple"``.
        temperature: sigmoid temperature of ``fusion="code"`` (authors: 100).
        bottleneck_tau: the ``tau`` of the code's modified Otsu (authors: 1.5).
        baseline: ``"zero"``, ``"mean"``, ``"blur"`` or a number (see the module docstring).
        blur_sigma: Gaussian sigma in pixels of the ``"blur"`` baseline.
        fast: score only one medoid per group of similar masks (see the module docstring).
        fast_factor: reduction of masked forwards per block in fast mode (groups = ceil(K / f)).
        fast_scores: how fast mode scores the other masks: ``"gp"`` (Gaussian-process interpolation from
            all scored masks of the block) or ``"medoid"`` (their group medoid's score).
        keep_mask_scores: put every mask's score ``Psi(x ⊙ m)`` in ``extras["mask_scores"][layer]`` (per
            image, in the order of :attr:`BlockSelection.scored`; fast mode: the scores it used).
        **kwargs: ``layers`` (default ``"blocks"``), ``score`` (default ``"softmax"``), ``batch_size``,
            ``output_adapter``, ``class_names`` (see :class:`~convlens.methods.base.Explainer`).
    """

    name: ClassVar[str] = "sise"
    paper: ClassVar[str] = "Sattarzadeh, Sudhakar et al., SISE, AAAI 2021"
    default_layers: ClassVar[LayerSpec] = "blocks"
    default_score: ClassVar[ScoreKind] = "softmax"

    def __init__(
        self,
        model: Any,
        mu: float = 0.0,
        fusion: FusionMode = "paper",
        temperature: float = 100.0,
        bottleneck_tau: float = 1.5,
        baseline: str | float = "zero",
        blur_sigma: float = 5.0,
        fast: bool = False,
        fast_factor: float = 2.0,
        fast_scores: Literal["gp", "medoid"] = "gp",
        keep_mask_scores: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        try:
            mu = float(mu)
        except (TypeError, ValueError):
            raise ValueError(f"mu must be a number >= 0 (Eq. 7), got {mu!r}") from None
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"mu must be a finite number >= 0 (Eq. 7), got {mu}")
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSION_MODES)}")
        if isinstance(baseline, str):
            try:
                baseline = float(baseline)
            except ValueError:
                if baseline not in BASELINES:
                    raise ValueError(
                        f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or a number"
                    ) from None
        elif not isinstance(baseline, int | float) or isinstance(baseline, bool):
            raise TypeError(
                f"baseline must be one of {', '.join(BASELINES)} or a number, got {type(baseline).__name__}"
            )
        if float(blur_sigma) <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
        if float(fast_factor) < 1:
            raise ValueError(f"fast_factor must be >= 1, got {fast_factor}")
        if fast_scores not in ("gp", "medoid"):
            raise ValueError(f"unknown fast_scores {fast_scores!r}; choose gp or medoid")
        if float(temperature) <= 0 or float(bottleneck_tau) <= 0:
            raise ValueError("temperature and bottleneck_tau must be > 0")
        self.mu = mu
        self.fusion: FusionMode = fusion
        self.temperature = float(temperature)
        self.bottleneck_tau = float(bottleneck_tau)
        self.baseline = baseline if isinstance(baseline, str) else float(baseline)
        self.blur_sigma = float(blur_sigma)
        if isinstance(fast, str):
            if fast.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"fast must be true or false, got {fast!r}")
            fast = fast.strip().lower() in ("1", "true", "yes", "on")
        self.fast = bool(fast)
        self.fast_factor = float(fast_factor)
        self.fast_scores = fast_scores
        self.keep_mask_scores = bool(keep_mask_scores)

    def params(self) -> dict[str, Any]:
        return super().params() | {
            "layers": self.layer_spec if isinstance(self.layer_spec, str) else list(self._layers or []),
            "mu": self.mu,
            "fusion": self.fusion,
            "temperature": self.temperature,
            "bottleneck_tau": self.bottleneck_tau,
            "baseline": self.baseline,
            "blur_sigma": self.blur_sigma,
            "fast": self.fast,
            "fast_factor": self.fast_factor,
            "fast_scores": self.fast_scores,
        }

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
        """Eq. 7-8: indices with ``alpha_k > mu · beta``, ``beta = max alpha`` (arg-max always kept when
        ``beta > 0``), and the relative threshold used (``mu``; None when ``beta <= 0``)."""
        beta = float(alpha.max())
        if beta <= 0:  # no channel raises the score: no attribution mask (Eq. 7 with mu=0 keeps none either)
            return torch.empty(0, dtype=torch.long, device=alpha.device), None
        keep = alpha > self.mu * beta
        keep[int(alpha.argmax())] = True
        return torch.nonzero(keep)[:, 0], self.mu

    def _select(
        self, acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], layers: Sequence[str]
    ) -> list[list[BlockSelection]]:
        batch = next(iter(acts.values())).shape[0]
        selections: list[list[BlockSelection]] = []
        for b in range(batch):
            per_block = []
            for name in layers:
                if acts[name].ndim != 4:
                    raise ValueError(f"layer {name!r} output has shape {tuple(acts[name].shape)}: SISE needs 4-D maps")
                alpha = grads[name][b].float().mean(dim=(1, 2))
                kept, relative = self.select_channels(alpha)
                beta = float(alpha.max())
                maps = acts[name][b].float()[kept].flatten(1)
                varying = maps.amax(1) > maps.amin(1)
                per_block.append(
                    BlockSelection(
                        layer=name,
                        kept=kept,
                        scored=kept[varying],
                        activations=acts[name][b].float()[kept[varying]],
                        candidates=int(alpha.numel()),
                        alpha=alpha,
                        threshold=None if relative is None else relative * beta,
                        relative_threshold=relative,
                    )
                )
            selections.append(per_block)
        return selections

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
        if isinstance(self.baseline, float):
            return self.baseline
        if self.baseline == "zero":
            return 0.0
        if self.baseline == "mean":
            return image.mean(dim=(1, 2), keepdim=True)
        from torchvision.transforms.functional import gaussian_blur

        limit = 2 * min(image.shape[-2:]) - 1  # reflect padding needs kernel // 2 < size
        kernel = min(2 * math.ceil(3 * self.blur_sigma) + 1, limit if limit % 2 else limit - 1)
        return gaussian_blur(image, [kernel, kernel], [self.blur_sigma, self.blur_sigma])

    @staticmethod
    def attribution_masks(feature_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Omega (after Eq. 8): bilinear up-sampling to ``size`` and per-mask min-max normalisation (eps 1e-6);
        (K, h, w) -> (K, H, W)."""
        return minmax_normalize(upsample(feature_maps, size), eps=MASK_EPS)

    def _visualization_maps(
        self,
        engine: MaskedForwardEngine,
        image: torch.Tensor,
        class_id: torch.Tensor,
        blocks: list[BlockSelection],
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Eqs. 9-12 for one image and all its blocks: (B_blocks, H, W) un-normalised ``V_b``.

        Full mode: one engine run streams every kept mask of every block in chunks of ``batch_size``
        (chunks cross block boundaries, so every forward but the last is full); the masks are generated
        chunk by chunk at input resolution and accumulated on the fly.
        """
        n_blocks = len(blocks)
        vis = torch.zeros(n_blocks, size[0] * size[1], device=image.device)
        baseline = self.baseline_for(image)
        info: dict[str, Any] = {}
        if self.fast:
            groups = [
                group_masks(sel.activations, math.ceil(sel.n_scored / self.fast_factor))
                if sel.n_scored
                else (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
                for sel in blocks
            ]
            sources = [
                sel.activations[medoids.to(sel.activations.device)]
                for sel, (_, medoids) in zip(blocks, groups, strict=True)
            ]
        else:
            groups = []
            sources = [sel.activations for sel in blocks]
        # flat list of (block, start, end) runs covering all masks in stream order
        runs: list[tuple[int, int, int]] = [(i, 0, src.shape[0]) for i, src in enumerate(sources) if src.shape[0]]
        total = sum(end for _, _, end in runs)
        pending: deque[list[tuple[int, int, int]]] = deque()  # per chunk: (block, offset in chunk, count)
        cursor = {"run": 0, "pos": 0}

        def next_chunk(_i: int) -> torch.Tensor | None:
            parts: list[torch.Tensor] = []
            layout: list[tuple[int, int, int]] = []
            filled = 0
            while filled < self.batch_size and cursor["run"] < len(runs):
                block, _, end = runs[cursor["run"]]
                take = min(self.batch_size - filled, end - cursor["pos"])
                maps = sources[block][cursor["pos"] : cursor["pos"] + take]
                parts.append(self.attribution_masks(maps, size))
                layout.append((block, filled, take))
                filled += take
                cursor["pos"] += take
                if cursor["pos"] >= end:
                    cursor["run"] += 1
                    cursor["pos"] = 0
            if not parts:
                return None
            pending.append(layout)
            return torch.cat(parts)[:, None]

        def accumulate(chunk: torch.Tensor, scores: torch.Tensor) -> None:
            layout = pending.popleft()
            flat = chunk.reshape(chunk.shape[0], -1)
            weights = scores[:, 0] / (flat.sum(1) + MASK_EPS)  # Psi(x ⊙ m) · C_m, C_m = m / sum(m)
            for block, offset, count in layout:
                vis[block].addmv_(flat[offset : offset + count].T, weights[offset : offset + count])

        if not self.fast:
            scores = engine.run(image, next_chunk, class_id, baseline=baseline, on_chunk=accumulate)[:, 0]
            info["forwards"] = total
            info["mask_scores"] = list(scores.detach().cpu().split([src.shape[0] for src in sources]))
            return vis.view(n_blocks, *size), info

        scores = engine.run(image, next_chunk, class_id, baseline=baseline)[:, 0]
        # unscored masks get an interpolated score (or their medoid's); contributions are each mask's own C_m
        offset = 0
        info["mask_scores"] = [torch.empty(0) for _ in blocks]
        for block, (sel, (labels, medoids)) in enumerate(zip(blocks, groups, strict=True)):
            if not sel.n_scored:
                continue
            medoid_scores = scores[offset : offset + medoids.numel()]
            offset += medoids.numel()
            if self.fast_scores == "medoid":
                member_scores = medoid_scores[labels.to(scores.device)]
            else:
                member_scores = interpolate_scores(mask_features(sel.activations), medoids, medoid_scores)
                member_scores = member_scores.to(scores.device)
            info["mask_scores"][block] = member_scores.detach().cpu()
            for start in range(0, sel.n_scored, self.batch_size):
                masks = self.attribution_masks(sel.activations[start : start + self.batch_size], size).flatten(1)
                weights = member_scores[start : start + self.batch_size] / (masks.sum(1) + MASK_EPS)
                vis[block].addmv_(masks.T, weights)
        kept = sum(sel.n_scored for sel in blocks)
        info["forwards"] = total
        info["fast"] = {"groups": [int(m.numel()) for _, m in groups], "forwards_saved": kept - total}
        return vis.view(n_blocks, *size), info

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
        finals: list[torch.Tensor] = []
        vis_maps: list[torch.Tensor] = []
        fused_maps: list[dict[str, torch.Tensor]] = []
        extras: dict[str, Any] = {
            "kept_masks": {name: [] for name in layers},
            "candidates": {name: [] for name in layers},
            "constant_masks": {name: [] for name in layers},
            "selection_threshold": {name: [] for name in layers},
            "relative_threshold": {name: [] for name in layers},
            "fusion_threshold": {name: [] for name in layers},
            "skipped_blocks": [],
            "masked_forwards": [],
        }
        fusion_time = 0.0
        for b in range(x.shape[0]):
            blocks = selections[b]
            raw, info = self._visualization_maps(engine, x[b], class_ids[b], blocks, size)
            t_fuse = time.perf_counter()
            normalised = minmax_exact(raw)
            informative = [i for i in range(len(blocks)) if blocks[i].n_scored and bool(normalised[i].max() > 0)]
            fused_by_layer: dict[str, torch.Tensor] = {}
            thresholds: dict[int, float | None] = {}
            if informative:
                final, intermediates, gate_thresholds = fuse_visualization_maps(
                    [normalised[i] for i in informative], self.fusion, self.temperature, self.bottleneck_tau
                )
                for i, fused, thr in zip(informative[1:], intermediates, gate_thresholds, strict=True):
                    fused_by_layer[layers[i]] = fused
                    thresholds[i] = thr
            else:
                final = torch.zeros(size, device=x.device)
            fusion_time += time.perf_counter() - t_fuse
            finals.append(final)
            vis_maps.append(normalised)
            fused_maps.append(fused_by_layer)
            for i, sel in enumerate(blocks):
                extras["kept_masks"][sel.layer].append(sel.n_kept)
                extras["constant_masks"][sel.layer].append(sel.n_kept - sel.n_scored)
                extras["candidates"][sel.layer].append(sel.candidates)
                extras["selection_threshold"][sel.layer].append(sel.threshold)
                extras["relative_threshold"][sel.layer].append(sel.relative_threshold)
                extras["fusion_threshold"][sel.layer].append(thresholds.get(i))
            extras["skipped_blocks"].append([layers[i] for i in range(len(blocks)) if i not in informative])
            extras["masked_forwards"].append(info["forwards"])
            if self.keep_mask_scores:
                extras.setdefault("mask_scores", {name: [] for name in layers})
                for sel, block_scores in zip(blocks, info["mask_scores"], strict=True):
                    extras["mask_scores"][sel.layer].append(block_scores.tolist())
            if "fast" in info:
                extras.setdefault("fast", {"groups": [], "forwards_saved": []})
                extras["fast"]["groups"].append(info["fast"]["groups"])
                extras["fast"]["forwards_saved"].append(info["fast"]["forwards_saved"])
        t3 = time.perf_counter()
        layer_maps: dict[str, torch.Tensor] = {
            name: torch.stack([v[i] for v in vis_maps]).detach().cpu() for i, name in enumerate(layers)
        }
        for name in layers[1:]:
            if any(name in f for f in fused_maps):
                layer_maps[f"fused@{name}"] = (
                    torch.stack([f.get(name, torch.zeros(size, device=x.device)) for f in fused_maps]).detach().cpu()
                )
        extras["fusion"] = {"mode": self.fusion, "temperature": self.temperature, "bottleneck_tau": self.bottleneck_tau}
        extras["baseline"] = self.baseline
        return MethodOutput(
            maps=torch.stack(finals),
            layer_maps=layer_maps,
            extras=extras,
            forward_passes=x.shape[0] + engine.forward_passes,
            backward_passes=x.shape[0],
            timings={
                "forward_backward": t1 - t0,
                "selection": t2 - t1,
                "masked_forwards": t3 - t2 - fusion_time,
                "fusion": fusion_time,
            },
        )

"""Ground-truth (localisation) metrics: does the map point at the annotated object?

Called directly, every metric takes ``saliency`` (B, H, W) or (H, W) and a boolean ground-truth ``mask`` of
the same shape (G: the explained class's object mask, or the union of its bounding boxes) and returns one
float64 score per image; an empty ground truth gives NaN (counted, never hidden, by
:class:`~convlens.metrics.base.MetricAccumulator`). ``evaluate(context)`` scores the context's map against
its ``mask`` (NaN when the explained class is not annotated). These are the SISE paper's ground-truth
metrics (Sattarzadeh et al., AAAI-21, "Experiments": EBPG, mIoU, Bbox) plus the pointing game.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from convlens.metrics.base import Direction, Metric, MetricCategory, as_map_batch, top_fraction_mask, top_k_mask
from convlens.metrics.context import MetricContext, MetricValue

__all__ = ["BoundingBoxAccuracy", "EnergyPointingGame", "LocalisationMetric", "PointingGame", "TopFractionIoU"]


class LocalisationMetric(Metric):
    """Base of the ground-truth metrics: ``metric(saliency, mask) -> (B,) float64 scores``."""

    category: ClassVar[MetricCategory] = MetricCategory.GROUND_TRUTH
    requires: ClassVar[frozenset[str]] = frozenset({"mask"})

    def evaluate(self, context: MetricContext) -> MetricValue:
        if context.mask is None:  # the explained class is not annotated on this image
            return MetricValue(float("nan"))
        return MetricValue(float(self(context.saliency, context.mask)[0]))

    def __call__(self, saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
        maps, masks = as_map_batch(saliency, mask)
        scores = self.compute(maps, masks)
        empty = masks.flatten(1).sum(1) == 0
        return torch.where(empty, torch.full_like(scores, float("nan")), scores)

    def compute(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B,) scores from float64 maps (B, H, W) and boolean masks (B, H, W)."""
        raise NotImplementedError


class EnergyPointingGame(LocalisationMetric):
    r"""Energy-Based Pointing Game (Wang et al., Score-CAM, CVPR-W 2020, Sec. 5.2; SISE Table 1 "EBPG").

    .. math:: \mathrm{EBPG} = \frac{\lVert S \odot G \rVert_1}{\lVert S \rVert_1}
              = \frac{\sum_{p \in G} S_p}{\sum_p S_p}

    the fraction of the map's energy that falls inside the ground truth. The ratio is invariant to the
    map's scale; negative values (signed attributions such as Integrated Gradients) are set to 0 first
    (``clip_negative=True``; with ``False`` a signed map gives a signed ratio). A map with no positive
    energy gives NaN. Quantus calls the same quantity Relevance Mass Accuracy (Arras et al. 2022).
    """

    name: ClassVar[str] = "ebpg"
    direction: ClassVar[Direction] = Direction.HIGHER

    def __init__(self, clip_negative: bool = True) -> None:
        self.clip_negative = clip_negative

    def compute(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.clip_negative:
            maps = maps.clamp_min(0)
        total = maps.flatten(1).sum(1)
        inside = (maps * masks).flatten(1).sum(1)
        return torch.where(total != 0, inside / total.where(total != 0, torch.ones_like(total)), torch.nan)


class TopFractionIoU(LocalisationMetric):
    r"""IoU of the top-``fraction`` pixels of the map with the ground truth; its dataset mean is the SISE
    paper's mIoU (Sattarzadeh et al., AAAI-21, "Experiments": "binarise S by keeping its top 20 % pixels").

    .. math:: T = \mathrm{top}_k(S),\; k = \lfloor f \cdot HW + 1/2 \rfloor;\qquad
              \mathrm{IoU} = \frac{|T \cap G|}{|T \cup G|}

    Ties at the threshold are broken by position (row-major, first pixel first), so exactly k pixels are
    kept (``f = 0.2`` by default).
    """

    name: ClassVar[str] = "miou"
    direction: ClassVar[Direction] = Direction.HIGHER

    def __init__(self, fraction: float = 0.2) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def compute(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        kept = top_fraction_mask(maps, self.fraction)
        intersection = (kept & masks).flatten(1).sum(1).double()
        union = (kept | masks).flatten(1).sum(1).double()
        return intersection / union


class BoundingBoxAccuracy(LocalisationMetric):
    r"""Bounding-box accuracy "Bbox" (Schulz et al., IBA, ICLR 2020, Sec. 4.3; SISE Table 1 "Bbox").

    .. math:: N = |G|,\qquad \mathrm{Bbox} = \frac{|\mathrm{top}_N(S) \cap G|}{N}

    the fraction of the N most salient pixels that fall inside the ground truth, N being the number of
    ground-truth pixels (position breaks ties, as in :class:`TopFractionIoU`). Quantus's Relevance Rank
    Accuracy (Arras et al. 2022) is the same quantity.
    """

    name: ClassVar[str] = "bbox"
    direction: ClassVar[Direction] = Direction.HIGHER

    def compute(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        sizes = masks.flatten(1).sum(1)
        scores = torch.empty(maps.shape[0], dtype=torch.float64)
        for i in range(maps.shape[0]):
            n = int(sizes[i])
            if n == 0:
                scores[i] = float("nan")
                continue
            kept = top_k_mask(maps[i : i + 1], n)
            scores[i] = float((kept & masks[i : i + 1]).sum()) / n
        return scores


class PointingGame(LocalisationMetric):
    r"""Pointing game (Zhang et al., Excitation Backprop, ECCV 2016 / IJCV 2018, Sec. 4.1).

    A hit (1) when the map's maximum lies on the ground truth, a miss (0) otherwise; the dataset mean is
    the pointing accuracy ``hits / (hits + misses)``. With ``tolerance = t > 0`` (the usual protocol uses
    15 px, as in TorchRay's benchmark) the point hits when some ground-truth pixel lies at Euclidean
    distance ``< t`` from it:

    .. math:: p^* = \arg\max_p S_p,\qquad \mathrm{hit} = \mathbb{1}[\min_{q \in G} \lVert p^* - q \rVert_2 < t]
              \quad (t = 0: \mathbb{1}[p^* \in G])

    ``ties="first"`` takes the first maximum in row-major order; ``ties="any"`` counts a hit if any
    maximal pixel hits (Quantus's convention).
    """

    name: ClassVar[str] = "pointing_game"
    direction: ClassVar[Direction] = Direction.HIGHER

    def __init__(self, tolerance: float = 0.0, ties: Literal["first", "any"] = "first") -> None:
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        if ties not in ("first", "any"):
            raise ValueError(f"ties must be 'first' or 'any', got {ties!r}")
        self.tolerance = float(tolerance)
        self.ties = ties

    def compute(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(maps.shape[0], dtype=torch.float64)
        for i in range(maps.shape[0]):
            gt = masks[i].numpy()
            if not gt.any():
                scores[i] = float("nan")
                continue
            accept = distance_transform_edt(~gt) < self.tolerance if self.tolerance > 0 else gt
            flat = maps[i].flatten()
            points = torch.argmax(flat)[None] if self.ties == "first" else torch.nonzero(flat == flat.max())[:, 0]
            scores[i] = float(accept.reshape(-1)[points.numpy()].any())
        return scores

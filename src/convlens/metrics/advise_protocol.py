"""The ADVISE evaluation protocol (AVX, Dehshibi et al. 2024) as metrics with metadata.

The protocol itself — every step of ``iCalculateCAMmetrics.m`` and its documented options — is computed by
:mod:`convlens.methods.avx` (ADVISE selects its map with it, so it sits in the methods layer); this module
re-exports that API and adds one :class:`~convlens.metrics.base.Metric` per reported quantity.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from convlens.core.targets import OutputAdapter
from convlens.methods.avx import (
    AVXOptions,
    AVXResult,
    as_maps,
    avx_mask,
    avx_protocol,
    class_sensitivity,
    display_image_uint8,
    harmonic_avx,
    masked_similarity,
)
from convlens.metrics.base import Direction, Metric, MetricCategory
from convlens.models.preprocessing import Preprocessing

__all__ = [
    "AVX",
    "AVXOptions",
    "AVXResult",
    "AverageDropMaxClass",
    "ClassSensitivity",
    "MaskedFSIMc",
    "MaskedSSIM",
    "NormalizedMSE",
    "TopKHit",
    "avx_mask",
    "avx_protocol",
    "class_sensitivity",
    "display_image_uint8",
    "harmonic_avx",
    "masked_similarity",
]


# ----------------------------------------------------------------------------------------- Metric classes
class AVX(Metric):
    """AVX / XAIValue (Dehshibi et al. 2024, iCalculateCAMmetrics.m l.75-79): the harmonic mean of SSIM,
    FSIMc, 1 - MSE_n and 1 - AD of the image masked by the explanation, with top-5 hit and
    class-sensitivity gating. ``metric(model, image, map_top1, map_top2)`` -> :class:`AVXResult`."""

    name: ClassVar[str] = "avx"
    direction: ClassVar[Direction] = Direction.HIGHER
    category: ClassVar[MetricCategory] = MetricCategory.ADVISE

    def __init__(self, options: AVXOptions | None = None, preprocessing: Preprocessing | None = None,
                 output_adapter: OutputAdapter | None = None, batch_size: int = 32) -> None:
        self.options = options if options is not None else AVXOptions()
        self.preprocessing = preprocessing
        self.output_adapter = output_adapter
        self.batch_size = batch_size

    def __call__(self, model: Any, image: Any, map_top1: Any, map_top2: Any, class_id: int | None = None,
                 reference_score: float | None = None) -> AVXResult:
        return avx_protocol(
            model, image, map_top1, map_top2, class_id=class_id, reference_score=reference_score,
            preprocessing=self.preprocessing, options=self.options, output_adapter=self.output_adapter,
            batch_size=self.batch_size,
        )


class ClassSensitivity(Metric):
    """Class sensitivity (iCalculateCAMmetrics.m l.10-22): Pearson correlation of the maps of the top-1
    and top-2 classes; "close to zero or below zero" is good. ``metric(map_top1, map_top2)`` -> (G,) R."""

    name: ClassVar[str] = "class_sensitivity"
    direction: ClassVar[Direction] = Direction.LOWER
    category: ClassVar[MetricCategory] = MetricCategory.ADVISE

    def __init__(self, options: AVXOptions | None = None) -> None:
        self.options = options if options is not None else AVXOptions()

    def __call__(self, map_top1: Any, map_top2: Any) -> torch.Tensor:
        return class_sensitivity(as_maps(map_top1, "map_top1"), as_maps(map_top2, "map_top2"), self.options)[0]


class _AVXPart(Metric):
    """A component of :class:`AVX`, read from an :class:`AVXResult` (``metric(result)`` -> (G,) values)."""

    field_name: ClassVar[str] = ""
    category: ClassVar[MetricCategory] = MetricCategory.ADVISE

    def __call__(self, result: AVXResult, penalised: bool = True) -> torch.Tensor:
        if not penalised and self.field_name in result.raw:
            return result.raw[self.field_name]
        return getattr(result, self.field_name)


class AverageDropMaxClass(_AVXPart):
    """Average Drop of the AVX protocol: ``max(0, y_c - o_c) / y_c`` with ``o_c`` the maximum class
    probability on the masked image (iCalculateCAMmetrics.m l.42-44)."""

    name: ClassVar[str] = "avx_average_drop"
    direction: ClassVar[Direction] = Direction.LOWER
    field_name: ClassVar[str] = "average_drop"


class MaskedSSIM(_AVXPart):
    """SSIM between the masked and the original image (iCalculateCAMmetrics.m l.46)."""

    name: ClassVar[str] = "avx_ssim"
    direction: ClassVar[Direction] = Direction.HIGHER
    field_name: ClassVar[str] = "ssim"


class MaskedFSIMc(_AVXPart):
    """FSIMc (Zhang et al. 2011) between the masked and the original image (iCalculateCAMmetrics.m l.48)."""

    name: ClassVar[str] = "avx_fsimc"
    direction: ClassVar[Direction] = Direction.HIGHER
    field_name: ClassVar[str] = "fsimc"


class NormalizedMSE(_AVXPart):
    """``immse(Ĩ, I) / 255^2`` (iCalculateCAMmetrics.m l.53-57)."""

    name: ClassVar[str] = "avx_mse_n"
    direction: ClassVar[Direction] = Direction.LOWER
    field_name: ClassVar[str] = "mse_n"


class TopKHit(_AVXPart):
    """Hit: the explained class is among the top-5 classes of the masked image (iCalculateCAMmetrics.m l.32-34)."""

    name: ClassVar[str] = "avx_top5_hit"
    direction: ClassVar[Direction] = Direction.HIGHER
    field_name: ClassVar[str] = "hit"

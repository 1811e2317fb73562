"""The ADVISE evaluation protocol (AVX, Dehshibi et al. 2024) as metrics with metadata.

The protocol itself — every step of ``iCalculateCAMmetrics.m`` and its documented options — is computed by
:mod:`convlens.numerics.avx` (the model-free maths: masking, class sensitivity, SSIM / FSIMc / MSE_n, miss
penalty, harmonic mean) and :func:`convlens.methods.advise_avx.avx_protocol` (the forwards; ADVISE selects
its map with it). This module re-exports that API and adds one :class:`~convlens.metrics.base.Metric` per
reported quantity; each reads its number from one protocol run per explained class
(:meth:`AVXProtocolMetric.protocol`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import numpy as np
import torch

from convlens.core.maps import minmax_normalize
from convlens.core.targets import OutputAdapter
from convlens.methods.advise_avx import AVXResult, avx_protocol, display_image_uint8
from convlens.metrics.base import Direction, Metric, MetricCategory
from convlens.metrics.context import MetricContext, MetricValue
from convlens.models.preprocessing import Preprocessing
from convlens.numerics.avx import AVXOptions, as_maps, avx_mask, class_sensitivity, harmonic_avx, masked_similarity

__all__ = [
    "AVX",
    "AVXOptions",
    "AVXProtocolMetric",
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
class AVXProtocolMetric(Metric):
    """Base of the ADVISE metrics: each reads one number of the AVX protocol run on a context.

    ``evaluate(context)`` runs the protocol once per context and settings (shared by every ADVISE metric of
    the context) with ``M1`` the explained class's min-max normalised map and ``M2`` that of the runner-up
    class (the most probable other class: with the predicted class explained, the code's top-1 / top-2
    pair), on the pixels the model sees, normalised by the model's own preprocessing.

    Args:
        options: the protocol's choices (:class:`AVXOptions`; users give its fields one by one,
            ``--metric-param avx.mask=soft``).
        preprocessing: normalisation of the masked images; default the context's (the model's own).
        output_adapter: maps the model's raw output to logits.
        batch_size: masked images per forward pass.
    """

    category: ClassVar[MetricCategory] = MetricCategory.ADVISE
    requires: ClassVar[frozenset[str]] = frozenset({"image", "probabilities", "preprocessing", "explainer"})
    run_settings: ClassVar[tuple[str, ...]] = ("batch_size",)
    shares_parameters_of: ClassVar[str | None] = "avx"

    def __init__(self, options: AVXOptions | None = None, preprocessing: Preprocessing | None = None,
                 output_adapter: OutputAdapter | None = None, batch_size: int = 32) -> None:
        if options is not None and not isinstance(options, AVXOptions):
            raise ValueError(f"options must be an AVXOptions, got {type(options).__name__} (or give its fields)")
        self.options = options if options is not None else AVXOptions()
        self.preprocessing = preprocessing
        self.output_adapter = output_adapter
        self.batch_size = batch_size

    @classmethod
    def parameters(cls) -> set[str]:
        """The constructor's arguments and, one by one, the fields of :class:`AVXOptions`."""
        return super().parameters() | {f.name for f in fields(AVXOptions)}

    @classmethod
    def _build(cls, params: dict[str, Any]) -> Metric:
        option_names = {f.name for f in fields(AVXOptions)}
        arguments = {k: v for k, v in params.items() if k not in option_names}
        options = {k: v for k, v in params.items() if k in option_names}
        if options and "options" in arguments:
            raise ValueError(f"give either options or its fields {sorted(options)}, not both")
        if options:
            arguments["options"] = AVXOptions(**options)
        return cls(**arguments)

    def protocol(self, context: MetricContext) -> AVXResult:
        """The AVX protocol on the context's explanation (computed once per context and settings)."""
        key = ("avx", self.options, self.batch_size, id(self.preprocessing), id(self.output_adapter))
        return context.shared(key, lambda: self._run_protocol(context))

    def _run_protocol(self, context: MetricContext) -> AVXResult:
        runner_up = context.runner_up()
        map_top2 = context.need("explainer").explain(context.x, [runner_up]).maps.detach().float().cpu()
        image = np.array(context.need("image"), dtype=np.uint8)  # a writable copy
        return avx_protocol(
            context.model, image, minmax_normalize(context.saliency.float()), minmax_normalize(map_top2),
            class_id=context.target, preprocessing=self.preprocessing or context.need("preprocessing"),
            options=self.options, output_adapter=self.output_adapter, batch_size=self.batch_size,
        )

    def evaluate(self, context: MetricContext) -> MetricValue:
        return MetricValue(self.read(self.protocol(context)))

    def read(self, result: AVXResult) -> float:
        """This metric's number in a protocol result (first map pair)."""
        raise NotImplementedError


class AVX(AVXProtocolMetric):
    """AVX / XAIValue (Dehshibi et al. 2024, iCalculateCAMmetrics.m l.75-79): the harmonic mean of SSIM,
    FSIMc, 1 - MSE_n and 1 - AD of the image masked by the explanation, with top-5 hit and
    class-sensitivity gating. ``metric(model, image, map_top1, map_top2)`` -> :class:`AVXResult`."""

    name: ClassVar[str] = "avx"
    direction: ClassVar[Direction] = Direction.HIGHER
    shares_parameters_of: ClassVar[str | None] = None

    def __call__(self, model: Any, image: Any, map_top1: Any, map_top2: Any, class_id: int | None = None,
                 reference_score: float | None = None) -> AVXResult:
        return avx_protocol(
            model, image, map_top1, map_top2, class_id=class_id, reference_score=reference_score,
            preprocessing=self.preprocessing, options=self.options, output_adapter=self.output_adapter,
            batch_size=self.batch_size,
        )

    def read(self, result: AVXResult) -> float:
        return float(result.avx[0])


class ClassSensitivity(AVXProtocolMetric):
    """Class sensitivity (iCalculateCAMmetrics.m l.10-22): Pearson correlation of the maps of the top-1
    and top-2 classes; "close to zero or below zero" is good. ``metric(map_top1, map_top2)`` -> (G,) R."""

    name: ClassVar[str] = "class_sensitivity"
    direction: ClassVar[Direction] = Direction.LOWER

    def __call__(self, map_top1: Any, map_top2: Any) -> torch.Tensor:
        return class_sensitivity(as_maps(map_top1, "map_top1"), as_maps(map_top2, "map_top2"), self.options)[0]

    def read(self, result: AVXResult) -> float:
        return float(result.class_sensitivity[0])


class _AVXPart(AVXProtocolMetric):
    """A component of :class:`AVX`, read from an :class:`AVXResult` (``metric(result)`` -> (G,) values)."""

    field_name: ClassVar[str] = ""

    def __call__(self, result: AVXResult, penalised: bool = True) -> torch.Tensor:
        if not penalised and self.field_name in result.raw:
            return result.raw[self.field_name]
        return getattr(result, self.field_name)

    def read(self, result: AVXResult) -> float:
        return float(torch.as_tensor(self(result)).double().reshape(-1)[0])


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

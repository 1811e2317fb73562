"""What a metric is given: one explanation of one class of one image, and everything around it.

Every metric evaluates one :class:`MetricContext` (``metric.evaluate(context) -> MetricValue``), whatever
it needs from it: localisation metrics read the map and the ground-truth mask, perturbation metrics the
model, the preprocessed image and the map, sanity checks re-explain with the same method on other models
or classes, the AVX protocol also the pixels the model sees. A runner builds one context per explained
class and stays ignorant of metric families; the context's :meth:`MetricContext.shared` cache lets
several metrics reuse one expensive computation (one randomisation cascade for every MPRT similarity,
one AVX protocol run for every ADVISE number).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from convlens.models.preprocessing import Preprocessing

__all__ = ["CONTEXT_FIELDS", "ExplainerFactory", "MetricContext", "MetricValue"]

T = TypeVar("T")
ExplainerFactory = Callable[[nn.Module], Any]

# the optional context fields a metric may declare in ``Metric.requires``
CONTEXT_FIELDS = ("mask", "image", "probabilities", "preprocessing", "explainer", "make_explainer")


@dataclass(frozen=True)
class MetricValue:
    """One metric's result for one explained class: the number, and the curve behind it if any
    (insertion/deletion: the class score after each step)."""

    value: float
    curve: tuple[float, ...] | None = None

    @property
    def finite(self) -> float | None:
        """The value, or None when it is NaN or infinite (how records store it)."""
        return float(self.value) if math.isfinite(float(self.value)) else None


@dataclass(frozen=True, eq=False)
class MetricContext:
    """One explanation to judge.

    Attributes:
        model: the classifier (eval mode, on its device); the raw ``nn.Module``.
        x: (1, C, H, W) the preprocessed image, on the model's device.
        saliency: (1, H, W) the method's raw map of ``target`` at input resolution (CPU, float).
        target: the explained class id.
        mask: (1, H, W) boolean ground truth of ``target`` in the input geometry; None when the class is
            not annotated on this image (localisation metrics then give NaN).
        image: (H, W, 3) uint8 pixels the model sees (resized and cropped, before normalisation).
        probabilities: (classes,) the model's class probabilities on ``x`` (the run's metric score).
        preprocessing: the model's preprocessing (normalisation of masked images, the black pixel).
        explainer: the evaluated method bound to the model (re-explains other classes).
        make_explainer: builds the same method, same parameters, on another model (randomised copies).
        cache: computations shared by the metrics of this context (see :meth:`shared`).
    """

    model: nn.Module
    x: torch.Tensor
    saliency: torch.Tensor
    target: int
    mask: torch.Tensor | None = None
    image: np.ndarray | None = None
    probabilities: torch.Tensor | None = None
    preprocessing: Preprocessing | None = None
    explainer: Any = None
    make_explainer: ExplainerFactory | None = None
    cache: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def need(self, name: str) -> Any:
        """The field ``name``, or a clear error when the runner did not provide it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this metric needs the context's {name!r}, which was not provided")
        return value

    def shared(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` in this context; later calls with the same key reuse it."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def black(self) -> torch.Tensor:
        """(3, 1, 1) a black pixel in the model's input space (``preprocessing.normalize`` of zeros)."""
        return self.need("preprocessing").normalize(torch.zeros(3, 1, 1))

    def runner_up(self) -> int:
        """The most probable class other than ``target``."""
        probabilities = self.need("probabilities").clone()
        probabilities[self.target] = -math.inf
        return int(probabilities.argmax())

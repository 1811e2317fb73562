"""Metric contract: metadata (name, direction, category), one evaluation signature, dataset accumulation.

Quantus's metadata and fixed pipeline without its boilerplate, torch-cam's ``update/summary/reset``.
Every metric implements ``evaluate(context) -> MetricValue`` on a
:class:`~convlens.metrics.context.MetricContext` (one explained class of one image); most also keep a
direct batch call (``metric(maps, masks)``, ``metric(model, x, maps, classes)``, ...) documented on the
class. :class:`MetricAccumulator` gathers scores over a dataset and counts NaNs instead of hiding them.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import torch

from convlens.metrics.context import MetricContext, MetricValue

__all__ = [
    "Direction",
    "Metric",
    "MetricAccumulator",
    "MetricCategory",
    "as_map_batch",
    "bootstrap_ci",
    "top_fraction_mask",
    "top_k_mask",
]


class Direction(StrEnum):
    HIGHER = "higher"  # higher is better
    LOWER = "lower"  # lower is better


class MetricCategory(StrEnum):
    GROUND_TRUTH = "ground truth"  # localisation against annotated object masks/boxes
    MODEL_TRUTH = "model truth"  # faithfulness to the model's behaviour (perturbation)
    ADVISE = "advise protocol"  # Dehshibi et al.'s AVX protocol
    SANITY = "sanity check"  # randomisation tests (Adebayo et al. 2018)


class Metric:
    """Base of every metric.

    Subclasses set the metadata and implement :meth:`evaluate`; the docstring gives the formula and the
    paper. Class attributes:

    * ``name``, ``direction``, ``category`` — metadata (the category is for people: tables group by it;
      no runner switches on it);
    * ``requires`` — the optional :class:`MetricContext` fields the metric reads (``"mask"``: it needs
      ground truth, so data without annotations cannot be scored);
    * ``run_settings`` — constructor arguments that default to the run's settings of the same name
      (``score``: the judged class score; ``batch_size``: inputs per forward pass);
    * ``shares_parameters_of`` — the metric whose user parameters also configure this one (the ADVISE
      numbers all come from one AVX protocol run, configured as ``avx``).
    """

    name: ClassVar[str] = ""
    direction: ClassVar[Direction] = Direction.HIGHER
    category: ClassVar[MetricCategory] = MetricCategory.GROUND_TRUTH
    requires: ClassVar[frozenset[str]] = frozenset()
    run_settings: ClassVar[tuple[str, ...]] = ()
    shares_parameters_of: ClassVar[str | None] = None

    def evaluate(self, context: MetricContext) -> MetricValue:
        """This metric's value for the explanation in ``context``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluate(context)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def parameters(cls) -> set[str]:
        """Names a user may set (``--metric-param NAME.KEY=VALUE``): the constructor's arguments."""
        return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}

    @classmethod
    def from_params(cls, **params: Any) -> Metric:
        """An instance from user parameters (names checked by :meth:`parameters`)."""
        unknown = sorted(set(params) - cls.parameters())
        if unknown:
            raise ValueError(f"metric {cls.name!r} does not accept {unknown}; it accepts {sorted(cls.parameters())}")
        return cls._build(params)

    @classmethod
    def _build(cls, params: dict[str, Any]) -> Metric:
        """The instance from checked parameters (a metric whose parameters are not its constructor's
        arguments overrides this)."""
        return cls(**params)

    @classmethod
    def metadata(cls) -> dict[str, str]:
        return {"name": cls.name, "direction": cls.direction.value, "category": cls.category.value}


@dataclass
class MetricAccumulator:
    """Dataset-level accumulation: ``update(score)``, ``summary()``, ``reset()``; NaNs are counted."""

    name: str
    values: list[float] = field(default_factory=list)
    nan_count: int = 0

    def update(self, value: float) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            self.nan_count += 1
        else:
            self.values.append(float(value))

    def summary(self, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
        """Mean, count, NaN count and a percentile-bootstrap confidence interval of the mean."""
        n = len(self.values)
        mean = sum(self.values) / n if n else float("nan")
        low, high = bootstrap_ci(self.values, confidence, n_resamples, seed)
        return {"mean": mean, "n": n, "nan_count": self.nan_count, "ci_low": low, "ci_high": high}

    def reset(self) -> None:
        self.values.clear()
        self.nan_count = 0


def bootstrap_ci(
    values: list[float] | np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (``scipy.stats.bootstrap``, seeded, so a
    summary is reproducible); NaN bounds with fewer than two values, ``(v, v)`` when all values are equal."""
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size < 2:
        return float("nan"), float("nan")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    from scipy.stats import bootstrap

    result = bootstrap(
        (data,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        rng=np.random.default_rng(seed), vectorized=True,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def as_map_batch(
    saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert maps (B, H, W) or (H, W) to float64 CPU tensors, and masks to bool of the same
    shape (an all-False mask when ``mask`` is None)."""
    maps = torch.as_tensor(saliency).detach().cpu()
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"expected saliency maps of shape (B, H, W) or (H, W), got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.double()
    maps = maps.double()
    if not torch.isfinite(maps).all():
        raise ValueError("saliency maps contain NaN or infinite values")
    if mask is None:
        return maps, torch.zeros(maps.shape, dtype=torch.bool)
    masks = torch.as_tensor(mask).detach().cpu()
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape != maps.shape:
        raise ValueError(
            f"ground-truth mask shape {tuple(masks.shape)} does not match saliency shape {tuple(maps.shape)}: "
            "up-sample the maps to the input resolution first"
        )
    return maps, masks.bool()


def top_k_mask(maps: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean (B, H, W) mask of the ``k`` largest pixels of each map (``k`` an int or one per map).

    Ties are broken by position (stable descending sort: the first pixel in row-major order wins), so
    exactly ``k`` pixels are kept whatever the map.
    """
    batch = maps.shape[0]
    flat = maps.reshape(batch, -1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand(batch, -1))
    k_t = torch.as_tensor(k, device=flat.device).reshape(-1, 1)
    return (ranks < k_t).reshape(maps.shape)


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the top ``fraction`` of pixels of each map: ``k = floor(fraction * H * W + 1/2)``
    (at least 1) pixels, ties broken by position (see :func:`top_k_mask`)."""
    n_pixels = maps.shape[-1] * maps.shape[-2]
    k = max(1, math.floor(fraction * n_pixels + 0.5))
    return top_k_mask(maps, k)

"""Metric contract: metadata (name, direction, category) plus stateful dataset accumulation.

Quantus's metadata without its boilerplate, torch-cam's ``update/summary/reset``. A metric is a
callable returning one score per image; :class:`MetricAccumulator` gathers scores over a dataset and
counts NaNs instead of hiding them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

__all__ = ["Direction", "Metric", "MetricAccumulator", "MetricCategory"]


class Direction(StrEnum):
    HIGHER = "higher"  # higher is better
    LOWER = "lower"  # lower is better


class MetricCategory(StrEnum):
    GROUND_TRUTH = "ground truth"  # localisation against annotated object masks/boxes
    MODEL_TRUTH = "model truth"  # faithfulness to the model's behaviour (perturbation)
    ADVISE = "advise protocol"  # Dehshibi et al.'s AVX protocol
    SANITY = "sanity check"  # randomisation tests (Adebayo et al. 2018)


class Metric:
    """Base of every metric. Subclasses set the class attributes and implement ``__call__``;
    the docstring gives the formula and the paper."""

    name: ClassVar[str] = ""
    direction: ClassVar[Direction] = Direction.HIGHER
    category: ClassVar[MetricCategory] = MetricCategory.GROUND_TRUTH

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

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

    def summary(self) -> dict[str, float]:
        n = len(self.values)
        mean = sum(self.values) / n if n else float("nan")
        return {"mean": mean, "n": n, "nan_count": self.nan_count}

    def reset(self) -> None:
        self.values.clear()
        self.nan_count = 0

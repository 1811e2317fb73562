"""Evaluation metrics: ground truth, model truth, the ADVISE (AVX) protocol and sanity checks.

Every metric has metadata (name, direction, category) and one evaluation signature,
``metric.evaluate(MetricContext) -> MetricValue`` (:mod:`convlens.metrics.context`); most also keep a direct
batch call. ``convlens.metrics.registry`` maps the names used by ``convlens evaluate`` to these classes.
"""

from convlens.metrics.base import Direction, Metric, MetricAccumulator, MetricCategory, bootstrap_ci
from convlens.metrics.context import MetricContext, MetricValue
from convlens.metrics.faithfulness import DeletionAUC, DropPercent, IncreasePercent, InsertionAUC
from convlens.metrics.localisation import BoundingBoxAccuracy, EnergyPointingGame, PointingGame, TopFractionIoU
from convlens.metrics.registry import available_metrics, create_metric, create_metrics
from convlens.metrics.sanity import ModelParameterRandomisation, RandomLogit

__all__ = [
    "BoundingBoxAccuracy",
    "DeletionAUC",
    "Direction",
    "DropPercent",
    "EnergyPointingGame",
    "IncreasePercent",
    "InsertionAUC",
    "Metric",
    "MetricAccumulator",
    "MetricCategory",
    "MetricContext",
    "MetricValue",
    "ModelParameterRandomisation",
    "PointingGame",
    "RandomLogit",
    "TopFractionIoU",
    "available_metrics",
    "bootstrap_ci",
    "create_metric",
    "create_metrics",
]

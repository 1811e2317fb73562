"""Evaluation metrics: ground truth, model truth, the ADVISE (AVX) protocol and sanity checks."""

from convlens.metrics.base import Direction, Metric, MetricAccumulator, MetricCategory

__all__ = ["Direction", "Metric", "MetricAccumulator", "MetricCategory"]

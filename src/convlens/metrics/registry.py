"""Metric registry: evaluation names -> metric classes with default settings (imported lazily).

The ADVISE protocol's metrics (``convlens.metrics.advise_protocol``) join the registry under their own
``name`` attributes once that module is importable.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from convlens.metrics.base import Metric

__all__ = [
    "METRICS",
    "MetricSpec",
    "available_metrics",
    "create_metric",
    "create_metrics",
    "get_metric_spec",
    "metric_class",
]


@dataclass(frozen=True)
class MetricSpec:
    """``target`` = ``"module:Class"``; ``defaults`` = keyword arguments the name implies."""

    target: str
    defaults: dict[str, Any] = field(default_factory=dict)


_MPRT = "convlens.metrics.sanity:ModelParameterRandomisation"

METRICS: dict[str, MetricSpec] = {
    "ebpg": MetricSpec("convlens.metrics.localisation:EnergyPointingGame"),
    "miou": MetricSpec("convlens.metrics.localisation:TopFractionIoU"),
    "bbox": MetricSpec("convlens.metrics.localisation:BoundingBoxAccuracy"),
    "pointing_game": MetricSpec("convlens.metrics.localisation:PointingGame"),
    "drop": MetricSpec("convlens.metrics.faithfulness:DropPercent"),
    "increase": MetricSpec("convlens.metrics.faithfulness:IncreasePercent"),
    "insertion": MetricSpec("convlens.metrics.faithfulness:InsertionAUC"),
    "deletion": MetricSpec("convlens.metrics.faithfulness:DeletionAUC"),
    "mprt_spearman_abs": MetricSpec(_MPRT, {"similarity": "spearman_abs"}),
    "mprt_spearman": MetricSpec(_MPRT, {"similarity": "spearman"}),
    "mprt_ssim": MetricSpec(_MPRT, {"similarity": "ssim"}),
    "random_logit": MetricSpec("convlens.metrics.sanity:RandomLogit"),
}

ADVISE_MODULE = "convlens.metrics.advise_protocol"


def _advise_specs() -> dict[str, MetricSpec]:
    """Metric classes of the ADVISE protocol module, when it exists."""
    try:
        module = importlib.import_module(ADVISE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == ADVISE_MODULE:
            return {}
        raise
    specs: dict[str, MetricSpec] = {}
    for attr, value in vars(module).items():
        if (
            inspect.isclass(value) and issubclass(value, Metric) and value.__module__ == ADVISE_MODULE
            and value.name and not inspect.isabstract(value)
        ):
            specs[value.name] = MetricSpec(f"{ADVISE_MODULE}:{attr}")
    return specs


def _all_specs() -> dict[str, MetricSpec]:
    return METRICS | _advise_specs()


def available_metrics() -> list[str]:
    return list(_all_specs())


def get_metric_spec(name: str) -> MetricSpec:
    specs = _all_specs()
    key = name.strip().lower().replace("-", "_")
    if key not in specs:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(specs)}")
    return specs[key]


def metric_class(name: str) -> type[Metric]:
    module_name, class_name = get_metric_spec(name).target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_metric(name: str, **params: Any) -> Metric:
    """Instantiate metric ``name`` with its implied defaults overridden by ``params`` (validated)."""
    spec = get_metric_spec(name)
    cls = metric_class(name)
    unknown = sorted(set(params) - cls.parameters())
    if unknown:
        raise ValueError(f"metric {name!r} does not accept {unknown}; it accepts {sorted(cls.parameters())}")
    return cls.from_params(**(spec.defaults | params))


def create_metrics(
    names: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    run_settings: Mapping[str, Any] | None = None,
) -> dict[str, Metric]:
    """The metrics of a run, by name, in order.

    Each metric gets, from lowest to highest priority: the run's settings it declares in
    ``Metric.run_settings`` (e.g. ``score``, ``batch_size``); the user parameters of the metric named by
    ``Metric.shares_parameters_of``; its own user parameters ``params[name]``.
    """
    params = params or {}
    run_settings = run_settings or {}
    metrics: dict[str, Metric] = {}
    for name in names:
        cls = metric_class(name)
        given = {k: run_settings[k] for k in cls.run_settings if k in run_settings}
        if cls.shares_parameters_of is not None:
            given |= params.get(cls.shares_parameters_of, {})
        try:
            metrics[name] = create_metric(name, **(given | dict(params.get(name, {}))))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric {name}: {exc}") from exc
    return metrics

"""The per-image work of an evaluation: one image in, one JSON-ready record per method out.

:class:`ItemEvaluator` holds what is built once per process — or once per worker of a distributed
engine: the model, one explainer per method and the metrics. Calling it on a :class:`WorkItem` loads the
image, explains each explained class with every method the item lists, scores every metric on one
:class:`~convlens.metrics.context.MetricContext` per (method, class), and returns an
:class:`ItemResult` (records, plus the report's overlays for the first images). It writes nothing: the
store and the report do. An evaluator pickles as its settings, dataset and model, and rebuilds its
explainers and metrics when unpickled, so an engine can ship it to each worker once.

The explained class ("target") is each ground-truth class of the image (``targets="label"``, the SISE
protocol: one explanation per annotated class) or the predicted class (``targets="predicted"``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from convlens.core.maps import minmax_normalize
from convlens.core.targets import adapt_output
from convlens.data.base import ImageDataset, Sample, preprocess_mask
from convlens.methods.registry import create
from convlens.metrics.context import MetricContext
from convlens.metrics.registry import create_metrics
from convlens.models.images import ImageLoadError
from convlens.models.zoo import LoadedModel
from convlens.runners.evaluate_setup import EvaluationConfig, EvaluationError

__all__ = ["ItemEvaluator", "ItemResult", "SampleImages", "WorkItem"]


@dataclass(frozen=True)
class WorkItem:
    """One image to evaluate: its dataset index, store key and id, the methods still missing for it,
    and whether the report shows it (``keep_samples``)."""

    index: int
    key: str
    sample_id: str
    methods: tuple[str, ...]
    keep_samples: bool = False


@dataclass
class SampleImages:
    """What the report shows of one image: the pixels the model sees, the ground truth of each explained
    class that has one, and each method's min-max normalised maps (one per explained class)."""

    display: Any  # PIL image
    targets: list[int]
    masks: dict[int, np.ndarray]
    maps: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ItemResult:
    """The outcome of one :class:`WorkItem`: a record per method, or the reason the image is unusable."""

    item: WorkItem
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_reason: str | None = None
    samples: SampleImages | None = None


@dataclass
class _Prepared:
    sample: Sample
    x: torch.Tensor  # (1, C, H, W) on the device
    display: Any  # PIL image the model sees
    pixels: np.ndarray  # (H, W, 3) uint8 of ``display``
    masks: dict[int, np.ndarray]  # preprocessed ground truth per class
    probabilities: torch.Tensor  # (classes,)
    targets: list[int]


class ItemEvaluator:
    """Evaluate images one at a time: ``evaluator(item) -> ItemResult``.

    Args:
        config: the run's settings (methods and their parameters, metrics, targets, scores, device).
        dataset: where ``item.index`` is loaded from.
        loaded: the model (already on the configured device, in eval mode).
    """

    def __init__(self, config: EvaluationConfig, dataset: ImageDataset, loaded: LoadedModel) -> None:
        self.config = config
        self.dataset = dataset
        self.loaded = loaded
        self._build()

    def _build(self) -> None:
        config = self.config
        self.device = torch.device(config.device)
        self.explainers = {}
        for method in config.methods:
            try:
                self.explainers[method] = create(method, self.loaded, **config.method_kwargs(method))
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"method {method}: {exc}") from exc
        try:
            self.metrics = create_metrics(
                config.metrics, config.metric_params, {"score": config.metric_score, "batch_size": config.batch_size}
            )
        except (TypeError, ValueError) as exc:
            raise EvaluationError(str(exc)) from exc

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "dataset": self.dataset, "loaded": self.loaded}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.loaded.module.to(torch.device(self.config.device)).eval()
        self._build()

    def __call__(self, item: WorkItem) -> ItemResult:
        try:
            sample = self.dataset.load(item.index)
        except ImageLoadError as exc:
            return ItemResult(item, bad_reason=str(exc))
        prepared = self._prepare(sample)
        result = ItemResult(item)
        if item.keep_samples:
            shown = {t: prepared.masks[t] for t in prepared.targets if t in prepared.masks}
            result.samples = SampleImages(prepared.display, list(prepared.targets), shown)
        for method in item.methods:
            record, maps = self._evaluate_method(prepared, method)
            result.records[method] = record | {"key": item.key, "index": item.index, "id": item.sample_id}
            if result.samples is not None:
                result.samples.maps[method] = minmax_normalize(maps.float()).numpy()
        return result

    def _prepare(self, sample: Sample) -> _Prepared:
        loaded, config = self.loaded, self.config
        x = loaded.preprocessing(sample.image)[None].to(self.device)
        with torch.inference_mode():
            logits = adapt_output(loaded.module(x)).float()[0]
        sigmoid = config.metric_score == "sigmoid"
        probabilities = (torch.sigmoid(logits) if sigmoid else torch.softmax(logits, 0)).cpu()
        targets = list(sample.labels) if config.targets == "label" and sample.labels else [int(logits.argmax())]
        masks = {c: preprocess_mask(m, loaded.preprocessing) for c, m in sample.masks.items()}
        display = loaded.preprocessing.display(sample.image)
        return _Prepared(sample, x, display, np.array(display, dtype=np.uint8), masks, probabilities, targets)

    def _evaluate_method(self, prepared: _Prepared, method: str) -> tuple[dict[str, Any], torch.Tensor]:
        """The record of one method on one image (every explained class), and its maps (T, H, W)."""
        k = len(prepared.targets)
        start = time.perf_counter()
        explanation = self.explainers[method].explain(prepared.x.expand(k, -1, -1, -1), prepared.targets)
        seconds = time.perf_counter() - start
        maps = explanation.maps.detach().float()
        rows = [
            self._target_row(prepared, target, self._context(prepared, method, maps[t : t + 1].cpu(), target))
            for t, target in enumerate(prepared.targets)
        ]
        record = {"method": method, "seconds": seconds / k, "forward_passes": explanation.forward_passes,
                  "targets": rows}
        return record, maps.cpu()

    def _context(self, prepared: _Prepared, method: str, saliency: torch.Tensor, target: int) -> MetricContext:
        mask = prepared.masks.get(target)
        return MetricContext(
            model=self.loaded.module, x=prepared.x, saliency=saliency, target=target,
            mask=None if mask is None else torch.from_numpy(mask)[None], image=prepared.pixels,
            probabilities=prepared.probabilities, preprocessing=self.loaded.preprocessing,
            explainer=self.explainers[method],
            make_explainer=partial(create, method, **self.config.method_kwargs(method)),
        )

    def _target_row(self, prepared: _Prepared, target: int, context: MetricContext) -> dict[str, Any]:
        """Every metric on one explained class (in the run's metric order), with the class's facts."""
        values: dict[str, float | None] = {}
        curves: dict[str, list[float]] = {}
        for name, metric in self.metrics.items():
            value = metric.evaluate(context)
            values[name] = value.finite
            if value.curve is not None:
                curves[name] = [round(v, 6) for v in value.curve]
        names = self.loaded.class_names
        labels = prepared.sample.labels
        predicted = int(prepared.probabilities.argmax())
        return {
            "target": target,
            "target_name": names[target] if target < len(names) else str(target),
            "label": labels,
            "predicted": predicted,
            "correct": (predicted in labels) if labels else None,
            "probability": round(float(prepared.probabilities[target]), 6),
            "has_mask": target in prepared.masks,
            "metrics": values,
            "curves": curves,
        }

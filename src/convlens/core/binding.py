"""A classifier bound for explanation: the one place that knows how to read a model.

Every explainer — saliency methods (:mod:`convlens.methods`) and the layer explainer INV
(:mod:`convlens.inv`) — is a :class:`BoundExplainer`: it holds a :class:`ModelBinding` (the ``nn.Module``
unwrapped from a :class:`~convlens.models.LoadedModel`, its name and class names, the output adapter that
turns its output into (B, classes) logits, the differentiated score, its device, a per-input-shape cache of
resolved layers), its checked parameters and its layer spec. What each kind returns is its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from convlens.core.hooks import eval_mode
from convlens.core.inputs import explained_input
from convlens.core.layers import LayerSpec
from convlens.core.params import MethodParams, ParamError
from convlens.core.targets import (
    SCORE_KINDS,
    OutputAdapter,
    ScoreKind,
    TargetSpec,
    adapt_output,
    class_scores,
    resolve_targets,
)

__all__ = ["BoundExplainer", "ModelBinding"]

T = TypeVar("T")


class ModelBinding:
    """A model with everything needed to score classes of it.

    Args:
        model: an ``nn.Module`` or a :class:`~convlens.models.LoadedModel` (its module, name and class
            names are used).
        score: ``"logit"``, ``"softmax"`` or ``"sigmoid"``.
        output_adapter: maps the raw model output to (B, classes) logits.
        class_names: lets targets be given by name (default: the LoadedModel's).
    """

    def __init__(
        self,
        model: nn.Module | Any,
        score: ScoreKind = "logit",
        output_adapter: OutputAdapter | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        model_name = None
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # LoadedModel
            class_names = class_names or getattr(model, "class_names", None)
            model_name = getattr(model, "name", None)
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if score not in SCORE_KINDS:
            raise ValueError(f"unknown score {score!r}: use logit, softmax or sigmoid")
        self.model = model
        self.model_name: str | None = model_name
        self.score: ScoreKind = score
        self.output_adapter = output_adapter
        self.class_names: list[str] | None = list(class_names) if class_names else None
        self._layer_cache: dict[tuple[Any, ...], Any] = {}

    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, classes) float logits of a batch (inference mode, eval mode, model state restored)."""
        with torch.inference_mode(), eval_mode(self.model), explained_input(self.model, x):
            return adapt_output(self.model(x), self.output_adapter).float()

    def adapt(self, output: object) -> torch.Tensor:
        """Logits from a raw model output (inside a caller's own forward)."""
        return adapt_output(output, self.output_adapter)

    def targets(self, logits: torch.Tensor, targets: TargetSpec = None) -> torch.Tensor:
        """Per-sample class ids (B,) for a target specification (None = predicted), validated."""
        return resolve_targets(logits, targets, self.class_names)

    def scores(self, logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """The bound score of ``class_ids`` (B,) or (B, T) in ``logits``."""
        return class_scores(logits, class_ids, self.score)

    def class_name(self, class_id: int) -> str | None:
        names = self.class_names
        return names[class_id] if names and 0 <= class_id < len(names) else None

    def cached_layers(self, key: tuple[Any, ...], resolve: Callable[[], T]) -> T:
        """``resolve()`` once per ``key`` (e.g. the input shape and a layer spec), then cached."""
        if key not in self._layer_cache:
            self._layer_cache[key] = resolve()
        return self._layer_cache[key]


class BoundExplainer:
    """What every explainer shares: the bound model, its typed parameters and its layer spec.

    Args:
        model: the classifier (an ``nn.Module`` or a :class:`~convlens.models.LoadedModel`).
        layers: a layer spec (None: the class's ``default_layers``).
        score: ``"logit"``, ``"softmax"`` or ``"sigmoid"`` (None: the class's ``default_score``).
        output_adapter: maps the raw model output to (B, classes) logits.
        class_names: lets targets be given by class name.
        params: an instance of the class's ``Params``; or give its fields as keyword arguments (``knobs``),
            checked by ``Params`` — never both.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_layers: ClassVar[bool] = True
    default_layers: ClassVar[LayerSpec] = "last"
    default_score: ClassVar[ScoreKind] = "logit"
    Params: ClassVar[type[MethodParams]] = MethodParams

    def __init__(
        self,
        model: nn.Module | Any,
        layers: LayerSpec | None = None,
        score: ScoreKind | None = None,
        output_adapter: OutputAdapter | None = None,
        class_names: Sequence[str] | None = None,
        params: MethodParams | None = None,
        **knobs: Any,
    ) -> None:
        self.binding = ModelBinding(model, score or self.default_score, output_adapter, class_names)
        if params is not None and knobs:
            raise ParamError(f"{self.name}: give either params= or keyword parameters, not both")
        if params is not None and not isinstance(params, self.Params):
            expected = self.Params.__name__
            article = "an" if expected[0] in "AEIOU" else "a"
            raise ParamError(f"{self.name}: params must be {article} {expected}, got {type(params).__name__}")
        self.config = params if params is not None else self.Params.from_mapping(knobs)
        self.layer_spec: LayerSpec = self.default_layers if layers is None else layers

    @property
    def model(self) -> nn.Module:
        return self.binding.model

    @property
    def score(self) -> ScoreKind:
        return self.binding.score

    @property
    def output_adapter(self) -> OutputAdapter | None:
        return self.binding.output_adapter

    @property
    def class_names(self) -> list[str] | None:
        return self.binding.class_names

    @property
    def device(self) -> torch.device:
        return self.binding.device

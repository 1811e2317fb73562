"""Base classes of explanation methods.

A method implements one thing:

* :class:`Explainer` subclasses implement ``_explain`` (maps for a batch, given resolved targets);
* :class:`GradientCAM` subclasses implement ``channel_weights`` (Grad-CAM family) or ``layer_map``
  (spatial weighting, LayerCAM) from one forward + one backward of all their layers.

The base handles input validation, targets (per sample, validated), layer resolution, timing, pass
counting and the :class:`~convlens.core.explanation.Explanation` result; the bound model, the parameter
checks and the device come from :class:`~convlens.core.binding.BoundExplainer`, shared with INV. The model's
training flags are restored after every call (the hooks live only inside ``explain``).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from convlens.core.acceleration import current_acceleration, memory_batch_size, to_device
from convlens.core.binding import BoundExplainer
from convlens.core.explanation import Explanation
from convlens.core.hooks import forward_with_grads
from convlens.core.inputs import as_image_batch
from convlens.core.layers import LayerSpec, resolve_layers
from convlens.core.maps import minmax_normalize, upsample
from convlens.core.params import MethodParams, ParamError
from convlens.core.targets import OutputAdapter, ScoreKind, TargetSpec, class_scores
from convlens.core.threads import limit_threads

__all__ = ["Explainer", "GradientCAM", "MethodOutput", "NoParams"]


class MethodOutput(dict):
    """What ``_explain`` returns: ``maps`` (B,H,W) plus optional ``layer_maps``, ``extras``,
    ``forward_passes``, ``backward_passes``, ``timings``."""


@dataclass(frozen=True)
class NoParams(MethodParams):
    """A method without knobs of its own."""


class Explainer(BoundExplainer, abc.ABC):
    """Base of every saliency method: ``explain`` gives one map per image (an :class:`Explanation`).

    Args:
        model: the classifier (an ``nn.Module`` or a :class:`~convlens.models.LoadedModel`).
        layers: ``"last"``, ``"blocks"``, names or modules (methods working on the input ignore it).
        score: ``"logit"``, ``"softmax"`` or ``"sigmoid"``; default per method (its paper's choice).
        output_adapter: maps the raw model output to (B, classes) logits.
        batch_size: masked inputs per forward pass for sampling methods.
        class_names: lets targets be given by class name.
        params: the method's parameter object (an instance of its ``Params``); or give the same
            knobs as keyword arguments (``create("rise", model, n_masks=1000)``), checked by ``Params``.
    """

    Params: ClassVar[type[MethodParams]] = NoParams
    # ``batch_size`` counts inference-only forwards (so "auto" may size it from inference memory)
    masked_batches: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module | Any,
        layers: LayerSpec | None = None,
        score: ScoreKind | None = None,
        output_adapter: OutputAdapter | None = None,
        batch_size: int = 64,
        class_names: Sequence[str] | None = None,
        params: MethodParams | None = None,
        **knobs: Any,
    ) -> None:
        super().__init__(model, layers, score, output_adapter, class_names, params, **knobs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ParamError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self._layers: list[str] | None = None

    def layers_for(self, x: torch.Tensor) -> list[str]:
        """Resolve (once per input shape) the layers this method uses."""
        shape = tuple(x.shape[1:])
        self._layers = self.binding.cached_layers(shape, lambda: resolve_layers(self.model, self.layer_spec, shape))
        return self._layers

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch (inference mode, eval mode)."""
        return self.binding.logits(x)

    def scores_of(self, logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.binding.scores(logits, class_ids)

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the result: score, batch size and the method's ``Params``."""
        return {"score": self.score, "batch_size": self.batch_size} | self.config.as_dict()

    # ------------------------------------------------------------------ public API
    def explain(self, x: torch.Tensor, targets: TargetSpec = None) -> Explanation:
        """Explain a batch ``x`` (B, C, H, W) — or one image (C, H, W) — for ``targets``.

        ``targets``: None/"auto" (predicted class), an int or class name for all images, or one
        class id per image. Within :func:`convlens.core.acceleration.accelerated`, the masked forwards use
        its precision and batch size (recorded in ``params``); a CPU image goes to a GPU through pinned memory.
        """
        x = to_device(as_image_batch(x), self.device, torch.float32)
        chosen = self._accelerated_batch_size(x)
        if chosen is None or chosen == self.batch_size:
            return self._explain_batch(x, targets)
        default, self.batch_size = self.batch_size, chosen
        try:
            return self._explain_batch(x, targets)
        finally:
            self.batch_size = default

    def _accelerated_batch_size(self, x: torch.Tensor) -> int | None:
        """The ambient batch size: an int, or ``"auto"`` sized from free GPU memory (masked-forward methods)."""
        acceleration = current_acceleration()
        if acceleration.batch_size == "auto" and self.masked_batches:
            return memory_batch_size(self.model, x[0], acceleration.precision, acceleration.memory_fraction,
                                     acceleration.max_batch_size)
        return acceleration.batch_size if isinstance(acceleration.batch_size, int) else None

    def _explain_batch(self, x: torch.Tensor, targets: TargetSpec) -> Explanation:
        start = time.perf_counter()
        logits = self.logits(x)
        class_ids = self.binding.targets(logits, targets)
        base_scores = self.scores_of(logits, class_ids)
        out = self._explain(x, class_ids, logits)
        timings = dict(out.get("timings", {}))
        timings["total"] = time.perf_counter() - start
        maps = out["maps"]
        if tuple(maps.shape) != (x.shape[0], *x.shape[-2:]):
            raise RuntimeError(f"{self.name} produced maps of shape {tuple(maps.shape)}")
        return Explanation(
            maps=maps.detach().float(),
            targets=class_ids.detach().cpu(),
            scores=base_scores.detach().float().cpu(),
            method=self.name,
            params=self.params() | _precision_record(),
            layer_maps=out.get("layer_maps", {}),
            layers=list(self._layers or []) if self.uses_layers else [],
            timings=timings,
            forward_passes=x.shape[0] + int(out.get("forward_passes", 0)),  # per image, as the methods count
            backward_passes=int(out.get("backward_passes", 0)),
            extras=out.get("extras", {}),
        )

    __call__ = explain

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing persists between calls: hooks live only inside ``explain``."""

    @abc.abstractmethod
    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        """Compute maps for the batch ``x`` and per-sample ``class_ids``."""


def _precision_record() -> dict[str, str]:
    """``{"precision": ...}`` when the masked forwards ran in reduced precision (nothing for fp32)."""
    precision = current_acceleration().precision
    return {} if precision == "fp32" else {"precision": precision}


def combine_layer_maps(
    layer_maps: dict[str, torch.Tensor], size: tuple[int, int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Up-sample each layer's (B, h, w) map to ``size``; one layer -> its raw map; several layers ->
    the mean of their min-max-normalised maps (pytorch-grad-cam's multi-layer aggregation)."""
    upsampled = {name: upsample(m, size) for name, m in layer_maps.items()}
    if len(upsampled) == 1:
        return next(iter(upsampled.values())), upsampled
    stacked = torch.stack([minmax_normalize(m) for m in upsampled.values()])
    return stacked.mean(0), upsampled


class GradientCAM(Explainer):
    """Base of the Grad-CAM family: one forward + one backward for all layers, then per layer
    ``map = ReLU(sum_k w_k A_k)`` with ``w = channel_weights(A, dY/dA)`` — or a custom ``layer_map``."""

    default_score: ClassVar[ScoreKind] = "logit"
    relu: ClassVar[bool] = True

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(B, K) weights from (B, K, h, w) activations and gradients."""
        raise NotImplementedError

    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(B, h, w) map of one layer (before ReLU); default: channel-weighted sum."""
        weights = self.channel_weights(activations, gradients)
        return torch.einsum("bk,bkhw->bhw", weights, activations)

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        layers = self.layers_for(x)
        t0 = time.perf_counter()
        _, acts, grads = forward_with_grads(
            self.model, x, layers, lambda lg: class_scores(lg, class_ids, self.score), self.output_adapter
        )
        t1 = time.perf_counter()
        per_layer = {}
        with limit_threads():  # a few small operations per layer (see convlens.core.threads)
            for name in layers:
                cam = self.layer_map(acts[name].float(), grads[name].float())
                per_layer[name] = torch.relu(cam) if self.relu else cam
            final, upsampled = combine_layer_maps(per_layer, tuple(x.shape[-2:]))
        return MethodOutput(
            maps=final,
            layer_maps=upsampled if len(layers) > 1 else {},
            forward_passes=x.shape[0],
            backward_passes=x.shape[0],
            timings={"forward_backward": t1 - t0, "maps": time.perf_counter() - t1},
        )

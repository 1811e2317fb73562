"""Integrated Gradients (Sundararajan, Taly, Yan, ICML 2017)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from convlens.core.hooks import eval_mode
from convlens.core.params import MethodParams, param
from convlens.core.targets import adapt_output, class_scores
from convlens.methods.base import Explainer, MethodOutput

__all__ = ["IGParams", "IntegratedGradients"]


@dataclass(frozen=True)
class IGParams(MethodParams):
    """Integrated Gradients' knobs (a tensor baseline is a data argument of the explainer instead)."""

    method = "ig"
    steps: int = param(50, "m, the number of Riemann-sum steps of Eq. 3", ge=1)
    baseline: float = param(0.0, "the baseline x' as a constant in the model's input space")
    aggregate: Literal["abs", "sum", "positive"] = param("abs", "channel aggregation of the pixel map")


class IntegratedGradients(Explainer):
    """Integrated Gradients, Riemann right-sum approximation (Eq. 3):
    ``IG_i(x) = (x_i - x'_i) · (1/m) Σ_{k=1..m} ∂F(x' + k/m (x - x'))/∂x_i``.

    ``baseline`` is 0 in the model's input space by default (the normalised mean image for ImageNet
    preprocessing): a number (a :class:`IGParams` knob) or a tensor broadcastable to the input. The
    pixel map aggregates channels: ``"abs"`` = |Σ_c IG_c| (default), ``"sum"`` = Σ_c IG_c (signed),
    ``"positive"`` = ReLU(Σ_c IG_c). Interpolated inputs go through the model in chunks of ``batch_size``.
    ``extras["completeness_gap"]`` reports Σ IG − (F(x) − F(x')) per image (the completeness axiom,
    Proposition 1; shrinks with more steps).
    """

    name = "ig"
    paper = "Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017"
    uses_layers = False
    default_score = "logit"
    Params: ClassVar[type[MethodParams]] = IGParams
    masked_batches: ClassVar[bool] = False  # its batches carry a backward pass: never sized from inference memory
    config: IGParams

    def __init__(self, model: Any, baseline: float | torch.Tensor | None = None, **kwargs: Any) -> None:
        kwargs.pop("layers", None)
        self.baseline_tensor = baseline if isinstance(baseline, torch.Tensor) else None
        if baseline is not None and self.baseline_tensor is None:
            kwargs["baseline"] = baseline
        super().__init__(model, **kwargs)

    @property
    def baseline(self) -> float | torch.Tensor:
        """The baseline x': the tensor given to the explainer, else the constant ``config.baseline``."""
        return self.baseline_tensor if self.baseline_tensor is not None else self.config.baseline

    def params(self) -> dict[str, Any]:
        recorded = super().params()
        if self.baseline_tensor is not None:
            recorded["baseline"] = "tensor"
        return recorded

    def attributions(self, x: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) integrated gradients."""
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device).expand_as(x)
        alphas = torch.arange(1, self.config.steps + 1, dtype=x.dtype, device=x.device) / self.config.steps
        result = torch.zeros_like(x)
        with eval_mode(self.model), torch.enable_grad():
            for b in range(x.shape[0]):
                delta = x[b] - baseline[b]
                grad_sum = torch.zeros_like(x[b])
                for start in range(0, self.config.steps, self.batch_size):
                    a = alphas[start : start + self.batch_size].view(-1, 1, 1, 1)
                    inputs = (baseline[b] + a * delta).requires_grad_(True)
                    logits = adapt_output(self.model(inputs), self.output_adapter)
                    ids = class_ids[b].expand(inputs.shape[0])
                    scores = class_scores(logits, ids, self.score)
                    (grad,) = torch.autograd.grad(scores.sum(), inputs)
                    grad_sum += grad.sum(0)
                result[b] = delta * grad_sum / self.config.steps
        return result

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        t0 = time.perf_counter()
        attr = self.attributions(x, class_ids)
        channel_sum = attr.sum(dim=1)
        aggregated = {"abs": channel_sum.abs(), "sum": channel_sum, "positive": torch.relu(channel_sum)}
        maps = aggregated[self.config.aggregate]
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device).expand_as(x)
        gap = attr.flatten(1).sum(1) - (
            self.scores_of(self.logits(x), class_ids) - self.scores_of(self.logits(baseline), class_ids)
        )
        return MethodOutput(
            maps=maps,
            forward_passes=x.shape[0] * (self.config.steps + 2),
            backward_passes=x.shape[0] * self.config.steps,
            extras={"completeness_gap": gap.tolist()},
            timings={"integrate": time.perf_counter() - t0},
        )

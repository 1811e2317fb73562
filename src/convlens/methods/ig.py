"""Integrated Gradients (Sundararajan, Taly, Yan, ICML 2017)."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch

from convlens.core.hooks import eval_mode
from convlens.core.targets import adapt_output, class_scores
from convlens.methods.base import Explainer, MethodOutput

__all__ = ["IntegratedGradients"]


class IntegratedGradients(Explainer):
    """Integrated Gradients, Riemann right-sum approximation (Eq. 3):
    ``IG_i(x) = (x_i - x'_i) · (1/m) Σ_{k=1..m} ∂F(x' + k/m (x - x'))/∂x_i``.

    ``baseline`` is 0 in the model's input space by default (the normalised mean image for ImageNet
    preprocessing). The pixel map aggregates channels: ``"abs"`` = |Σ_c IG_c| (default),
    ``"sum"`` = Σ_c IG_c (signed), ``"positive"`` = ReLU(Σ_c IG_c). Interpolated inputs go through
    the model in chunks of ``batch_size``. ``extras["completeness_gap"]`` reports
    Σ IG − (F(x) − F(x')) per image (the completeness axiom; shrinks with more steps).
    """

    name = "ig"
    paper = "Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017"
    uses_layers = False
    default_score = "logit"

    def __init__(
        self,
        model: Any,
        steps: int = 50,
        baseline: float | torch.Tensor = 0.0,
        aggregate: Literal["abs", "sum", "positive"] = "abs",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("layers", None)
        super().__init__(model, **kwargs)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if aggregate not in ("abs", "sum", "positive"):
            raise ValueError(f"unknown aggregate {aggregate!r}")
        self.steps = steps
        self.baseline = baseline
        self.aggregate = aggregate

    def params(self) -> dict[str, Any]:
        base = self.baseline if isinstance(self.baseline, float | int) else "tensor"
        return super().params() | {"steps": self.steps, "baseline": base, "aggregate": self.aggregate}

    def attributions(self, x: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) integrated gradients."""
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device).expand_as(x)
        alphas = torch.arange(1, self.steps + 1, dtype=x.dtype, device=x.device) / self.steps
        result = torch.zeros_like(x)
        with eval_mode(self.model), torch.enable_grad():
            for b in range(x.shape[0]):
                delta = x[b] - baseline[b]
                grad_sum = torch.zeros_like(x[b])
                for start in range(0, self.steps, self.batch_size):
                    a = alphas[start : start + self.batch_size].view(-1, 1, 1, 1)
                    inputs = (baseline[b] + a * delta).requires_grad_(True)
                    logits = adapt_output(self.model(inputs), self.output_adapter)
                    ids = class_ids[b].expand(inputs.shape[0])
                    scores = class_scores(logits, ids, self.score)
                    (grad,) = torch.autograd.grad(scores.sum(), inputs)
                    grad_sum += grad.sum(0)
                result[b] = delta * grad_sum / self.steps
        return result

    def _explain(self, x: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor) -> MethodOutput:
        t0 = time.perf_counter()
        attr = self.attributions(x, class_ids)
        channel_sum = attr.sum(dim=1)
        maps = {"abs": channel_sum.abs(), "sum": channel_sum, "positive": torch.relu(channel_sum)}[self.aggregate]
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device).expand_as(x)
        gap = attr.flatten(1).sum(1) - (
            self.scores_of(self.logits(x), class_ids) - self.scores_of(self.logits(baseline), class_ids)
        )
        return MethodOutput(
            maps=maps,
            forward_passes=x.shape[0] * (self.steps + 2),
            backward_passes=x.shape[0] * self.steps,
            extras={"completeness_gap": gap.tolist()},
            timings={"integrate": time.perf_counter() - t0},
        )

"""Integrated Gradients: literal Riemann sum (Eq. 3), completeness axiom, batches, tensor baseline, Params."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.core.params import ParamError
from convlens.methods import create
from convlens.methods.ig import IGParams, IntegratedGradients


def test_ig_equals_literal_riemann_sum(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    steps = 8
    explainer = IntegratedGradients(tiny_cnn, steps=steps, batch_size=3, aggregate="sum")
    attributions = explainer.attributions(tiny_images[:2], torch.tensor([1, 4]))
    for i, c in enumerate([1, 4]):
        total = torch.zeros_like(tiny_images[i])
        for k in range(1, steps + 1):
            point = (k / steps * tiny_images[i]).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(tiny_cnn(point[None])[0, c], point)
            total += grad
        torch.testing.assert_close(attributions[i], tiny_images[i] * total / steps, rtol=1e-4, atol=1e-6)
    result = explainer.explain(tiny_images[:2], [1, 4])
    torch.testing.assert_close(result.maps, attributions.sum(1), rtol=1e-4, atol=1e-6)


def test_completeness_axiom(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    coarse = IntegratedGradients(tiny_cnn, steps=4).explain(tiny_images, 2)
    fine = IntegratedGradients(tiny_cnn, steps=256, batch_size=64).explain(tiny_images, 2)
    with torch.no_grad():
        delta = tiny_cnn(tiny_images)[:, 2] - tiny_cnn(torch.zeros_like(tiny_images))[:, 2]
    gaps = torch.tensor(fine.extras["completeness_gap"]).abs()
    assert (gaps < 0.02 * delta.abs().clamp_min(1e-3) + 1e-3).all()
    assert gaps.sum() < torch.tensor(coarse.extras["completeness_gap"]).abs().sum()


def test_aggregations_and_batches(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    signed = IntegratedGradients(tiny_cnn, steps=6, aggregate="sum").explain(tiny_images)
    absolute = IntegratedGradients(tiny_cnn, steps=6, aggregate="abs").explain(tiny_images)
    positive = IntegratedGradients(tiny_cnn, steps=6, aggregate="positive").explain(tiny_images)
    torch.testing.assert_close(absolute.maps, signed.maps.abs())
    torch.testing.assert_close(positive.maps, signed.maps.clamp_min(0))
    single = IntegratedGradients(tiny_cnn, steps=6, aggregate="sum").explain(tiny_images[1])
    torch.testing.assert_close(signed.maps[1], single.maps[0], rtol=1e-4, atol=1e-6)


def test_tensor_baseline_is_data_and_recorded_as_tensor(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    baseline = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    explainer = IntegratedGradients(tiny_cnn, steps=4, baseline=baseline, aggregate="sum")
    attributions = explainer.attributions(tiny_images[:1], torch.tensor([3]))
    total = torch.zeros_like(baseline)
    for k in range(1, 5):  # Eq. 3 with x' = baseline
        point = (baseline + k / 4 * (tiny_images[0] - baseline)).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(tiny_cnn(point[None])[0, 3], point)
        total += grad
    torch.testing.assert_close(attributions[0], (tiny_images[0] - baseline) * total / 4, rtol=1e-4, atol=1e-6)
    assert explainer.params() == {"score": "logit", "batch_size": 64, "steps": 4, "baseline": "tensor",
                                  "aggregate": "sum"}
    assert create("ig", tiny_cnn, baseline="0.5").params()["baseline"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "ig.steps: must be >= 1, got 0"),
        ({"aggregate": "max"}, "ig.aggregate: must be one of 'abs', 'sum', 'positive', got 'max'"),
        ({"baseline": "black"}, "ig.baseline: expected a number, got 'black'"),
    ],
)
def test_params_check_their_ranges(tiny_cnn: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ParamError) as info:
        IntegratedGradients(tiny_cnn, **kwargs)
    assert str(info.value) == message
    assert {spec.name: spec.range for spec in IGParams.describe()} == {"steps": ">= 1", "baseline": "", "aggregate": ""}

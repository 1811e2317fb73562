"""Model-truth metrics: hand-computed 4x4 cases on a linear model, RISE's blur, and torch-cam as a peer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from convlens.core.maps import minmax_normalize
from convlens.metrics.base import Direction, MetricCategory
from convlens.metrics.faithfulness import (
    DeletionAUC,
    DropPercent,
    IncreasePercent,
    InsertionAUC,
    rise_blur,
    rise_gaussian_kernel,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# saliency with distinct values 1..16 (pixel order by saliency is unambiguous)
S = torch.tensor(
    [
        [16.0, 15.0, 2.0, 1.0],
        [14.0, 13.0, 3.0, 4.0],
        [5.0, 6.0, 12.0, 7.0],
        [8.0, 9.0, 10.0, 11.0],
    ]
)


class LinearScore(nn.Module):
    """logits = [sum(w ⊙ x) + bias, 0]: class 0's logit is a weighted pixel sum computable by hand."""

    def __init__(self, weight: torch.Tensor, bias: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone()[None, None])
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.weight).flatten(1).sum(1) + self.bias
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def _ones() -> torch.Tensor:
    return torch.ones(1, 1, 4, 4)


def test_deletion_toy_rise_spacing() -> None:
    # weights = S, image = ones; deleting 4 pixels per step in saliency order removes
    # 16+15+14+13 = 58, then 12+11+10+9 = 42, 8+7+6+5 = 26, 4+3+2+1 = 10: curve 136, 78, 36, 10, 0
    metric = DeletionAUC(step=4, score="logit")
    curve = metric.curve(LinearScore(S), _ones(), S, [0])
    assert curve.scores[0].tolist() == [136.0, 78.0, 36.0, 10.0, 0.0]
    assert curve.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # AUC = (sum - first/2 - last/2) / n_steps = (260 - 68) / 4
    assert curve.auc.item() == pytest.approx(48.0)


def test_insertion_toy_constant_substrate() -> None:
    # substrate 0.5 everywhere: start at 0.5 * 136 = 68 and add half of each group: 68, 97, 118, 131, 136
    metric = InsertionAUC(step=4, substrate=0.5, score="logit")
    curve = metric.curve(LinearScore(S), _ones(), S, [0])
    assert curve.scores[0].tolist() == [68.0, 97.0, 118.0, 131.0, 136.0]
    assert curve.auc.item() == pytest.approx((550 - 34 - 68) / 4)  # 112


def test_step_not_dividing_the_image_rise_vs_fraction_spacing() -> None:
    # step 5 on 16 pixels: n = ceil(16 / 5) = 4 steps changing 0, 5, 10, 15, 16 pixels.
    # groups of saliency: 16..12 (sum 70), 11..7 (45), 6..2 (20), 1 -> curve 136, 66, 21, 1, 0
    rise = DeletionAUC(step=5, score="logit").curve(LinearScore(S), _ones(), S, [0])
    assert rise.scores[0].tolist() == [136.0, 66.0, 21.0, 1.0, 0.0]
    assert rise.auc.item() == pytest.approx((224 - 68) / 4)  # 39: RISE spaces the points uniformly
    fraction = DeletionAUC(step=5, spacing="fraction", score="logit")(LinearScore(S), _ones(), S, [0])
    # trapezoid on x = 0, 5/16, 10/16, 15/16, 1: (101 + 43.5 + 11) * 5/16 + 0.5 / 16
    assert fraction.item() == pytest.approx(48.625)


def test_drop_and_increase_toy() -> None:
    # keep the top 15 %: k = floor(0.15 * 16 + 0.5) = 2 pixels (saliency 16 and 15)
    # weights S - 6, image ones: y = 136 - 96 = 40; kept: (16 - 6) + (15 - 6) = 19
    model = LinearScore(S - 6)
    assert DropPercent(score="logit")(model, _ones(), S, [0]).item() == pytest.approx(100 * (40 - 19) / 40)
    assert IncreasePercent(score="logit")(model, _ones(), S, [0]).item() == 0.0
    # softmax of [z, 0] is sigmoid(z); weights S - 9: y = sigmoid(-8), kept z = 7 + 6 = 13 -> an increase
    model = LinearScore(S - 9)
    assert DropPercent()(model, _ones(), S, [0]).item() == 0.0
    assert IncreasePercent()(model, _ones(), S, [0]).item() == 100.0
    # weights S - 8: y = sigmoid(0) = 0.5; kept z = 8 + 7 = 15 -> increase; with 50 % kept (8 pixels 16..9):
    # z = (8+7+6+5+4+3+2+1) = 36 -> still an increase; keep_fraction=None multiplies by the min-max map
    model = LinearScore(S - 8)
    sig = 1 / (1 + math.exp(-36))
    assert DropPercent(keep_fraction=0.5)(model, _ones(), S, [0]).item() == 0.0
    assert IncreasePercent(keep_fraction=0.5)(model, _ones(), S, [0]).item() == 100.0
    normalised = (S - 1) / 15  # min-max map: z = sum((S - 8) * (S - 1) / 15)
    z = float(((S - 8) * normalised).sum())
    assert z > 0 and sig > 0.5
    drop_cont = DropPercent(keep_fraction=None)(LinearScore(S - 8), _ones(), S, [0]).item()
    assert drop_cont == pytest.approx(100 * max(0.0, 0.5 - 1 / (1 + math.exp(-z))) / 0.5, abs=1e-4)


def test_baseline_and_batch_and_resize() -> None:
    # drop with a baseline of 1 (masked pixels set to 1 = unchanged image of ones) is 0
    model = LinearScore(S - 6)
    assert DropPercent(baseline=1.0, score="logit")(model, _ones(), S, [0]).item() == pytest.approx(0.0)
    # a batch equals single images; a 2x2 map is bilinearly resized to the 4x4 input
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 4, 4, generator=gen)
    maps = torch.rand(3, 4, 4, generator=gen)
    metric = DeletionAUC(step=3, score="logit", batch_size=2)
    batch = metric(model, x, maps, [0, 0, 0])
    singles = torch.cat([metric(model, x[i], maps[i], [0]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-9)
    small = torch.rand(1, 2, 2, generator=gen)
    assert DropPercent(score="logit")(model, x[:1], small, [0]).shape == (1,)


def test_validation() -> None:
    model = LinearScore(S)
    with pytest.raises(ValueError, match="step"):
        DeletionAUC(step=0)
    with pytest.raises(ValueError, match="keep_fraction"):
        DropPercent(keep_fraction=1.5)
    with pytest.raises(ValueError, match="class ids"):
        DropPercent()(model, torch.ones(2, 1, 4, 4), torch.rand(2, 4, 4), [0, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        DropPercent()(model, _ones(), torch.full((4, 4), float("nan")), [0])
    with pytest.raises(ValueError, match="substrate"):
        InsertionAUC(substrate="noise")(model, _ones(), S, [0])


def test_metadata() -> None:
    assert DropPercent.direction is Direction.LOWER and DeletionAUC.direction is Direction.LOWER
    assert IncreasePercent.direction is Direction.HIGHER and InsertionAUC.direction is Direction.HIGHER
    for cls in (DropPercent, IncreasePercent, InsertionAUC, DeletionAUC):
        assert cls.category is MetricCategory.MODEL_TRUTH and cls.__doc__ and "math" in cls.__doc__


def test_rise_blur_is_the_authors_kernel_with_zero_padding() -> None:
    # literal re-computation of RISE's gkern(11, 5): gaussian_filter of an impulse, and of conv2d with padding 5
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    kernel = gaussian_filter(impulse, 5)
    torch.testing.assert_close(rise_gaussian_kernel(), torch.from_numpy(kernel).float())
    assert float(rise_gaussian_kernel().sum()) == pytest.approx(1.0, abs=1e-6)
    x = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(2))
    expected = torch.zeros(3, 9, 9)
    padded = np.pad(x.numpy(), ((0, 0), (5, 5), (5, 5)))
    for c in range(3):
        for i in range(9):
            for j in range(9):
                expected[c, i, j] = float((padded[c, i : i + 11, j : j + 11] * kernel).sum())
    torch.testing.assert_close(rise_blur(x), expected, atol=1e-5, rtol=0)


def test_insertion_uses_blur_substrate_by_default(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    maps = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(4))
    default = InsertionAUC(step=64).curve(tiny_cnn, tiny_images[:1], maps, [1])
    explicit = InsertionAUC(step=64, substrate=rise_blur(tiny_images[0])).curve(tiny_cnn, tiny_images[:1], maps, [1])
    torch.testing.assert_close(default.scores, explicit.scores)
    # the first point is the blurred image, the last the original image
    with torch.no_grad():
        p_blur = torch.softmax(tiny_cnn(rise_blur(tiny_images[:1])), 1)[0, 1].item()
        p_orig = torch.softmax(tiny_cnn(tiny_images[:1]), 1)[0, 1].item()
    assert default.scores[0, 0].item() == pytest.approx(p_blur, abs=1e-5)
    assert default.scores[0, -1].item() == pytest.approx(p_orig, abs=1e-5)


# ----------------------------------------------------------------------------- peer: torch-cam
@pytest.fixture(scope="module")
def torchcam_metrics() -> object:
    """torch-cam's metrics module; only the peer comparisons skip when it is missing."""
    return pytest.importorskip("torchcam.metrics")


class FixedCAM:
    """torch-cam CAM-extractor protocol returning fixed maps (so both libraries judge the same map)."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model = model
        self.maps = maps

    def __call__(self, class_idx: object = None, scores: object = None, **kwargs: object) -> list[torch.Tensor]:
        return [self.maps.clone()]

    def fuse_cams(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        yield


@pytest.fixture
def peer_inputs(make_model: Callable[..., nn.Module]) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[int]]:
    model = make_model(seed=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    maps = minmax_normalize(torch.rand(3, 32, 32, generator=gen))  # continuous: no ties
    return model, x, maps, [1, 3, 0]


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_insertion_deletion_match_torchcam(kind: str, torchcam_metrics: Any, peer_inputs: Any) -> None:
    model, x, maps, classes = peer_inputs
    substrate = torch.zeros_like(x) if kind == "deletion" else rise_blur(x)
    peer = torchcam_metrics.DeletionInsertionMetric(
        FixedCAM(model, maps), lambda out: torch.softmax(out, dim=-1), steps=32, baseline=substrate, batch_size=16
    )
    peer.update(x, class_idx=classes)
    peer_auc = peer.summary()[f"{kind}_auc"]
    cls = DeletionAUC if kind == "deletion" else InsertionAUC
    ours = cls(step=32, substrate=None if kind == "insertion" else 0.0)(model, x, maps, classes)
    # 1024 pixels, 32 per step: torch-cam's 32 intervals of 32 pixels are RISE's steps; the AUCs coincide
    assert ours.mean().item() == pytest.approx(peer_auc, abs=1e-6)


def test_drop_increase_match_torchcam_classification_metric(torchcam_metrics: Any, peer_inputs: Any) -> None:
    model, x, maps, classes = peer_inputs
    peer = torchcam_metrics.ClassificationMetric(FixedCAM(model, maps), lambda out: torch.softmax(out, dim=-1))
    peer.update(x, class_idx=classes)
    summary = peer.summary()
    # torch-cam multiplies the input by the map itself: our keep_fraction=None; it reports fractions, we %
    drop = DropPercent(keep_fraction=None)(model, x, maps, classes).mean().item() / 100
    increase = IncreasePercent(keep_fraction=None)(model, x, maps, classes).mean().item() / 100
    # torch-cam divides by (y + 1e-7) instead of y: a relative difference below 1e-6 for y > 0.1
    assert drop == pytest.approx(summary["avg_drop"], abs=1e-6)
    assert increase == pytest.approx(summary["conf_increase"], abs=1e-12)


def test_fraction_spacing_matches_torchcam_when_step_does_not_divide_the_image(
    torchcam_metrics: Any, peer_inputs: Any
) -> None:
    # 1024 pixels: torch-cam's steps=10 gives intervals of ceil(1024 / 10) = 103 pixels and a last, shorter one;
    # our step=103 changes the same pixel counts (0, 103, ..., 927, 1024); RISE's uniform spacing would differ
    model, x, maps, classes = peer_inputs
    peer = torchcam_metrics.DeletionInsertionMetric(
        FixedCAM(model, maps), lambda out: torch.softmax(out, dim=-1), steps=10, baseline=torch.zeros_like(x)
    )
    peer.update(x, class_idx=classes)
    ours = DeletionAUC(step=103, spacing="fraction")(model, x, maps, classes)
    assert ours.mean().item() == pytest.approx(peer.summary()["deletion_auc"], abs=1e-6)
    rise = DeletionAUC(step=103)(model, x, maps, classes)
    assert abs(rise.mean().item() - ours.mean().item()) > 1e-6  # the two spacings differ (last interval 97 px)

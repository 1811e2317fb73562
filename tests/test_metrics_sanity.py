"""Sanity checks: similarity functions on hand-computed cases, the randomisation cascade against a literal
re-computation and against Quantus's MPRT, and the random-logit test."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from convlens.core.explanation import Explanation
from convlens.methods.gradcam import GradCAM
from convlens.metrics.base import Direction, MetricCategory
from convlens.metrics.sanity import (
    ModelParameterRandomisation,
    RandomLogit,
    randomisable_layers,
    spearman_similarity,
    ssim_similarity,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spearman_signed_and_absolute_toy() -> None:
    a = np.array([[-3.0, -2.0], [1.0, 4.0]])
    b = np.array([[3.0, 2.0], [1.0, 4.0]])
    # signed ranks 1,2,3,4 vs 3,2,1,4: d = (-2, 0, 2, 0), rho = 1 - 6 * 8 / (4 * 15) = 0.2
    assert spearman_similarity(a, b, absolute=False) == pytest.approx(0.2)
    # |a| = b exactly: rho = 1
    assert spearman_similarity(a, b, absolute=True) == pytest.approx(1.0)
    # reversed order: -1
    ramp = np.arange(16.0).reshape(4, 4)
    assert spearman_similarity(ramp, -ramp, absolute=False) == pytest.approx(-1)
    assert math.isnan(spearman_similarity(np.zeros((4, 4)), np.arange(16.0).reshape(4, 4), False))


def test_ssim_matches_skimage_on_normalised_maps() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((16, 16)) * 5 + 2, rng.random((16, 16))
    na, nb = (a - a.min()) / (a.max() - a.min()), (b - b.min()) / (b.max() - b.min())
    expected = structural_similarity(na, nb, data_range=1.0, win_size=7)
    assert ssim_similarity(a, b) == pytest.approx(expected, abs=1e-5)
    assert ssim_similarity(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-5)  # invariant to positive affine maps
    with pytest.raises(ValueError, match="too small"):
        ssim_similarity(np.ones((2, 2)), np.ones((2, 2)))


def test_randomisable_layers_follow_the_forward_order(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    names = randomisable_layers(tiny_cnn, tiny_images)
    assert names == ["block1.0", "block1.1", "block2.0", "block2.1", "block3.0", "fc"]


def test_cascade_equals_literal_recomputation_and_leaves_model_intact(
    tiny_cnn: nn.Module, tiny_images: torch.Tensor
) -> None:
    before = copy.deepcopy(tiny_cnn.state_dict())
    rng_state = torch.random.get_rng_state()
    targets = torch.tensor([0, 2, 4])
    metric = ModelParameterRandomisation(seed=7)
    result = metric.run(lambda m: GradCAM(m, layers="block2"), tiny_cnn, tiny_images, targets)
    # the trained model and the caller's RNG are untouched
    for key, value in tiny_cnn.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert result.steps == ["fc", "block3.0", "block2.1", "block2.0", "block1.1", "block1.0"]
    # literal re-computation: deep copy, reset layers top-down cumulatively with the seed, explain, compare
    original = GradCAM(tiny_cnn, layers="block2").explain(tiny_images, targets).maps.double().numpy()
    model = copy.deepcopy(tiny_cnn)
    modules = dict(model.named_modules())
    for k, name in enumerate(result.steps):
        torch.manual_seed(7)
        modules[name].reset_parameters()
        maps = GradCAM(model, layers="block2").explain(tiny_images, targets).maps.double().numpy()
        for b in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected_abs = spearmanr(np.abs(original[b]).ravel(), np.abs(maps[b]).ravel())[0]
            got = result.similarity["spearman_abs"][k, b].item()
            assert (math.isnan(got) and math.isnan(expected_abs)) or got == pytest.approx(expected_abs, abs=1e-9)
    torch.random.set_rng_state(rng_state)
    # __call__ returns the mean over steps of the chosen similarity; "last" the fully randomised one
    mean = metric(lambda m: GradCAM(m, layers="block2"), tiny_cnn, tiny_images, targets)
    torch.testing.assert_close(mean, torch.nanmean(result.similarity["spearman_abs"], 0))
    last = ModelParameterRandomisation(seed=7, aggregate="last", similarity="ssim")(
        lambda m: GradCAM(m, layers="block2"), tiny_cnn, tiny_images, targets
    )
    torch.testing.assert_close(last, result.similarity["ssim"][-1])


def test_independent_order_randomises_one_layer_at_a_time(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    metric = ModelParameterRandomisation(order="independent", layers=["fc", "block1"], seed=3)
    result = metric.run(lambda m: GradCAM(m, layers="block3"), tiny_cnn, tiny_images[:1], [1])
    # independent step "block1" alone == cascade whose only step is "block1"
    alone = ModelParameterRandomisation(layers=["block1"], seed=3).run(
        lambda m: GradCAM(m, layers="block3"), tiny_cnn, tiny_images[:1], [1]
    )
    torch.testing.assert_close(result.similarity["spearman"][1], alone.similarity["spearman"][0])
    with pytest.raises(ValueError, match="not found"):
        ModelParameterRandomisation(layers=["nope"]).run(lambda m: GradCAM(m), tiny_cnn, tiny_images[:1], [1])


def test_random_logit_classes_and_class_insensitive_method(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    metric = RandomLogit(seed=0)
    ids = torch.tensor([0, 1, 2, 3, 4] * 200)
    drawn = metric.random_classes(ids, 5)
    assert not torch.any(drawn == ids)
    counts = np.bincount(drawn.numpy(), minlength=5)
    assert counts.min() > 150  # every other class is drawn (1000 draws over 5 classes, 4 allowed per image)

    class ClassBlind:
        """A 'method' that ignores the class: its random-logit similarity must be 1."""

        def __init__(self, model: nn.Module) -> None:
            self.model = model

        def explain(self, x: torch.Tensor, targets: object) -> Explanation:
            maps = x.mean(1)
            return Explanation(maps=maps, targets=torch.as_tensor(targets), scores=torch.zeros(len(x)), method="blind")

    blind = metric(ClassBlind, tiny_cnn, tiny_images, [0, 1, 2], n_classes=5)
    torch.testing.assert_close(blind, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    # Grad-CAM: literal re-computation with the drawn classes
    metric = RandomLogit(seed=1, similarity="spearman")
    grad = metric(lambda m: GradCAM(m, layers="block2"), tiny_cnn, tiny_images, [0, 1, 2])
    other = RandomLogit(seed=1).random_classes(torch.tensor([0, 1, 2]), 5)
    a = GradCAM(tiny_cnn, layers="block2").explain(tiny_images, [0, 1, 2]).maps.numpy()
    b = GradCAM(tiny_cnn, layers="block2").explain(tiny_images, other).maps.numpy()
    for i in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = spearmanr(a[i].ravel(), b[i].ravel())[0]
        assert (math.isnan(expected) and math.isnan(grad[i].item())) or grad[i].item() == pytest.approx(expected)


def test_metadata_and_validation() -> None:
    for cls in (ModelParameterRandomisation, RandomLogit):
        assert cls.category is MetricCategory.SANITY and cls.direction is Direction.LOWER
        assert cls.__doc__ and "math" in cls.__doc__
    with pytest.raises(ValueError, match="similarity"):
        ModelParameterRandomisation(similarity="hog")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        RandomLogit().random_classes(torch.tensor([0]), 1)


# ----------------------------------------------------------------------------- peer: Quantus MPRT
@pytest.fixture(scope="module")
def quantus() -> object:
    """Quantus; only the peer comparisons skip when it is missing."""
    return pytest.importorskip("quantus")


@pytest.mark.filterwarnings("ignore")
def test_cascade_matches_quantus_mprt(tiny_cnn: nn.Module, tiny_images: torch.Tensor, quantus: Any) -> None:
    y = np.array([0, 2, 4])

    def explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs: object) -> np.ndarray:
        x = torch.as_tensor(inputs).float()
        return GradCAM(model, layers="block2").explain(x, torch.as_tensor(targets)).maps.numpy()[:, None]

    peer = quantus.MPRT(
        similarity_func=quantus.similarity_func.correlation_spearman, layer_order="top_down", seed=41,
        abs=True, normalise=False, disable_warnings=True,
    )
    expected = peer(model=tiny_cnn, x_batch=tiny_images.numpy(), y_batch=y, a_batch=None, explain_func=explain,
                    channel_first=True, device="cpu")
    # Quantus seeds each re-initialisation with seed + 1
    ours = ModelParameterRandomisation(seed=42).run(lambda m: GradCAM(m, layers="block2"), tiny_cnn, tiny_images, y)
    for k, name in enumerate(ours.steps):
        np.testing.assert_allclose(ours.similarity["spearman_abs"][k].numpy(), np.asarray(expected[name]), atol=1e-6)

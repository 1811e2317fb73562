"""Ada-SISE: the adaptive (Otsu) selection against scikit-image, the whole method against the literal SISE
re-computation (tests/_sise_reference.py), and fewer masks than SISE (mu = 0) on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from convlens.core.params import ParamError
from convlens.methods import create
from convlens.methods.adasise import AdaSISE, AdaSISEParams, adaptive_threshold
from convlens.methods.sise import SISE

BLOCKS = ("block1", "block2", "block3")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def literal_adaptive_keep(alpha: torch.Tensor) -> list[int]:
    """Spec 2.2 with scikit-image: Otsu over the positive mean gradients divided by their maximum."""
    values = alpha.double().numpy()
    positive = [k for k in range(len(values)) if values[k] > 0]
    if not positive:
        return []
    relative = values[positive] / values[positive].max()
    if np.all(relative == relative[0]):
        return positive
    tau = threshold_otsu(relative, nbins=256)
    return [k for k, a in zip(positive, relative, strict=True) if a > tau]


def test_adaptive_threshold_equals_scikit_image_otsu():
    g = torch.Generator().manual_seed(7)
    cases = [torch.randn(n, generator=g) for n in (5, 40, 300)]
    cases += [torch.randn(64, generator=g).abs() ** 3, torch.tensor([-1.0, 0.5, -0.2]), torch.tensor([-1.0, -2.0])]
    cases += [torch.tensor([0.3, 0.3, -1.0])]
    for alpha in cases:
        kept, tau = adaptive_threshold(alpha)
        assert kept.tolist() == literal_adaptive_keep(alpha)
        if (alpha > 0).sum() == 0:
            assert tau is None
        elif kept.numel() < int((alpha > 0).sum()):
            positive = alpha[alpha > 0]
            assert tau == pytest.approx(threshold_otsu((positive / positive.max()).double().numpy(), nbins=256))


@pytest.mark.parametrize("fusion", ["paper", "code"])
def test_adasise_equals_literal_recomputation(tiny_cnn, tiny_images, fusion, sise_reference):
    explanation = AdaSISE(tiny_cnn, fusion=fusion, batch_size=5).explain(tiny_images)
    for i, image in enumerate(tiny_images):
        final, vis_maps, kept = sise_reference.sise(tiny_cnn, image, fusion=fusion, keep_rule=literal_adaptive_keep)
        for layer in BLOCKS:
            assert explanation.extras["kept_masks"][layer][i] == kept[layer]["kept"]
            torch.testing.assert_close(explanation.layer_maps[layer][i], vis_maps[layer], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(explanation.maps[i], final, atol=5e-5, rtol=1e-4)
    assert explanation.method == "adasise"
    assert all(0 <= t < 1 for taus in explanation.extras["relative_threshold"].values() for t in taus)


def test_adasise_keeps_a_subset_of_sise_masks(tiny_cnn, tiny_images):
    ada = AdaSISE(tiny_cnn).select_feature_maps(tiny_images)
    sise = SISE(tiny_cnn).select_feature_maps(tiny_images)
    total_ada = total_sise = 0
    for image_ada, image_sise in zip(ada, sise, strict=True):
        for block_ada, block_sise in zip(image_ada, image_sise, strict=True):
            assert set(block_ada.kept.tolist()) <= set(block_sise.kept.tolist())
            assert block_ada.n_kept >= 1
            total_ada += block_ada.n_kept
            total_sise += block_sise.n_kept
    assert total_ada < total_sise


def test_adasise_api(tiny_cnn, tiny_images):
    explainer = create("adasise", tiny_cnn, fusion="simple", otsu_bins="64")
    assert isinstance(explainer, AdaSISE) and explainer.config.otsu_bins == 64
    assert list(explainer.params().items()) == [
        ("score", "softmax"), ("batch_size", 64), ("layers", "blocks"), ("fusion", "simple"), ("temperature", 100.0),
        ("bottleneck_tau", 1.5), ("baseline", "zero"), ("blur_sigma", 5.0), ("fast", False), ("fast_factor", 8.0),
        ("fast_scores", "gp"), ("selection", "otsu over normalised positive mean gradients"), ("otsu_bins", 64),
    ]
    with pytest.raises(ParamError, match="no mu; use SISE for a fixed mu"):
        AdaSISE(tiny_cnn, mu=0.5)
    with pytest.raises(ParamError, match=r"^adasise.otsu_bins: must be >= 2, got 1$"):
        AdaSISE(tiny_cnn, otsu_bins=1)
    with pytest.raises(ParamError, match=r"^adasise.fusion: must be one of"):
        AdaSISE(tiny_cnn, fusion="otsu")
    assert "mu" not in AdaSISEParams.names()
    assert {spec.name: spec.range for spec in AdaSISEParams.describe()}["otsu_bins"] == ">= 2"


@pytest.mark.slow
def test_adasise_keeps_fewer_masks_than_sise_on_real_photos():
    from PIL import Image
    from skimage import data

    from convlens.models import load

    loaded = load("efficientnet_lite0")
    photos = torch.stack([loaded.preprocessing(Image.fromarray(image)) for image in (data.chelsea(), data.coffee())])
    sise = SISE(loaded).select_feature_maps(photos)
    ada = AdaSISE(loaded).select_feature_maps(photos)
    for image_sise, image_ada in zip(sise, ada, strict=True):
        assert [b.layer for b in image_ada] == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2"]
        kept_sise = sum(b.n_kept for b in image_sise)
        kept_ada = sum(b.n_kept for b in image_ada)
        assert kept_ada < 0.7 * kept_sise  # the paper claims up to 30 % less time
        assert sum(b.n_scored for b in image_ada) < sum(b.n_scored for b in image_sise)
        assert all(a.n_kept <= s.n_kept for a, s in zip(image_ada, image_sise, strict=True))

    # the full method on the cat: forwards = target + phase 2 + scored masks, and the map is informative:
    # the image reduced to its top-15 % pixels keeps far more of the score than a random 15 % of them
    explanation = AdaSISE(loaded).explain(photos[:1])
    assert loaded.class_names[int(explanation.targets[0])] in ("tabby", "tiger cat", "Egyptian cat")
    assert explanation.forward_passes == 2 + sum(b.n_scored for b in ada[0])
    saliency = explanation.maps[0].flatten()
    n = int(0.15 * saliency.numel())
    top = torch.zeros_like(saliency).index_fill_(0, saliency.argsort(descending=True)[:n], 1.0)
    random = torch.zeros_like(saliency).index_fill_(
        0, torch.randperm(saliency.numel(), generator=torch.Generator().manual_seed(0))[:n], 1.0
    )
    with torch.inference_mode():
        masks = torch.stack([top, random]).view(2, 1, 224, 224)
        probs = torch.softmax(loaded.module(photos[:1] * masks), 1)[:, int(explanation.targets[0])]
    assert probs[0] > 10 * probs[1]

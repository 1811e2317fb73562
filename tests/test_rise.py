"""RISE: brute-force expectation with fixed masks, mask generator properties, batches."""

from __future__ import annotations

import torch
from torch import nn

from convlens.methods.rise import RISE, rise_masks


def test_rise_with_fixed_masks_is_the_monte_carlo_expectation(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(20, 1, 32, 32, generator=g) > 0.5).float()
    p = 0.5
    result = RISE(tiny_cnn, masks=masks, p=p, batch_size=6).explain(tiny_images[:2], [2, 0])
    for i, c in enumerate([2, 0]):
        expected = torch.zeros(32, 32)
        with torch.no_grad():
            for m in masks:
                prob = torch.softmax(tiny_cnn((tiny_images[i] * m)[None]), dim=1)[0, c]
                expected += prob * m[0]
        expected /= len(masks) * p
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    assert result.forward_passes == 1 + 2 * 20


def test_rise_masks_follow_the_paper() -> None:
    a = rise_masks(300, (32, 40), grid_size=4, p=0.3, generator=torch.Generator().manual_seed(0))
    b = rise_masks(300, (32, 40), grid_size=4, p=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (300, 1, 32, 40)
    assert a.min() >= 0 and a.max() <= 1
    assert abs(float(a.mean()) - 0.3) < 0.05  # E[m] = p
    # smooth: bilinear up-sampling of a 4x4 grid gives many intermediate values
    assert ((a > 0.05) & (a < 0.95)).float().mean() > 0.2


def test_seeded_and_batched(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = RISE(tiny_cnn, n_masks=64, grid_size=4, batch_size=16, seed=7)
    batch = explainer.explain(tiny_images)
    for i in range(3):
        torch.testing.assert_close(batch.maps[i], explainer.explain(tiny_images[i]).maps[0], rtol=1e-4, atol=1e-6)
    other_seed = RISE(tiny_cnn, n_masks=64, grid_size=4, batch_size=16, seed=8).explain(tiny_images[:1])
    assert not torch.allclose(other_seed.maps[0], batch.maps[0])

"""Map operations: both min-max normalisations by hand, Otsu's threshold against scikit-image, up-sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from convlens.core.maps import minmax_exact, minmax_normalize, upsample
from convlens.numerics.otsu import otsu_threshold


def test_minmax_normalize_by_hand() -> None:
    m = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    out = minmax_normalize(m, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert minmax_normalize(torch.ones(1, 3, 3)).abs().sum() == 0  # constant map -> zeros, not NaN
    assert float(minmax_normalize(m).max()) == pytest.approx(8 / (8 + 1e-6))  # the epsilon: max stays below 1


def test_minmax_exact_is_matlab_rescale() -> None:
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    torch.testing.assert_close(minmax_exact(maps)[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert minmax_exact(maps)[1].abs().sum() == 0  # constant map -> lower bound 0
    rows = torch.tensor([[4.0, 2.0, 3.0], [7.0, 7.0, 7.0]], dtype=torch.float64)
    assert minmax_exact(rows, dims=1).tolist() == [[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    big = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(0)) * 1e-5  # SISE's V_b are ~1e-5 sums
    assert torch.equal(minmax_exact(big).amax(dim=(1, 2)), torch.ones(4))


@pytest.mark.parametrize("seed", range(5))
def test_otsu_equals_skimage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0.25, 0.08, 700), rng.normal(0.7, 0.1, 300 + 50 * seed)])
    assert otsu_threshold(torch.tensor(values)) == pytest.approx(threshold_otsu(values, nbins=256), abs=1e-12)


def test_upsample_identity_and_bilinear() -> None:
    m = torch.arange(4.0).view(1, 2, 2)
    assert upsample(m, (2, 2)) is m
    up = upsample(m, (4, 4))
    assert up.shape == (1, 4, 4)
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 3  # align_corners=False keeps the corners' values here
    # by hand: source coordinate (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1]
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = row[None, :] + 2 * row[:, None]  # m = x + 2 y
    torch.testing.assert_close(up[0], expected)

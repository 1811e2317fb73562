"""Map operations: normalisation and Otsu's threshold against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from convlens.core.maps import minmax_normalize, otsu_threshold, upsample


def test_minmax_normalize_by_hand() -> None:
    m = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    out = minmax_normalize(m, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert minmax_normalize(torch.ones(1, 3, 3)).abs().sum() == 0  # constant map -> zeros, not NaN


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

"""Reveal images: the INV authors' mask construction re-computed literally with scipy.ndimage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from convlens.inv.reveal import (
    GOLD_PERCENTAGES,
    REVEAL_PERCENTAGES,
    binary_mask,
    blur_sigma,
    png_bytes,
    reveal_image,
    upsample_nearest,
)

SIGMA = {2: 3.0, 4: 6.0, 8: 12.0, 16: 16.0, 32: 24.0}


def literal_reveal(image: np.ndarray, fmap: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Spec steps written out: tile each cell f x f, percentile threshold, blur, multiply, truncate."""
    f = image.shape[0] // fmap.shape[0]
    tiled = np.zeros(image.shape[:2])
    for i in range(fmap.shape[0]):
        for j in range(fmap.shape[1]):
            tiled[i * f:(i + 1) * f, j * f:(j + 1) * f] = fmap[i, j]
    threshold = np.percentile(tiled.ravel(), 100 - q)
    mask = np.where(tiled >= threshold, 1.0, 0.0)
    soft = ndimage.gaussian_filter(mask, sigma=SIGMA.get(f, 3.0), truncate=1.5, mode="nearest")
    out = np.floor(image.astype(np.float64) * soft[:, :, None]).astype(np.uint8)
    return out, mask


@pytest.mark.parametrize(("size", "cells"), [(256, 16), (256, 32), (256, 64), (224, 7), (64, 64), (96, 24)])
def test_reveal_matches_literal_recomputation(size: int, cells: int) -> None:
    rng = np.random.default_rng(size + cells)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    fmap = rng.random((cells, cells))
    for q in REVEAL_PERCENTAGES:
        expected, _ = literal_reveal(image, fmap, q)
        np.testing.assert_array_equal(reveal_image(image, fmap, q), expected)


def test_revealed_fraction_per_level_and_monotone() -> None:
    """Binary mask share: at least q %, at most q % plus one tile (distinct map values), growing with q."""
    rng = np.random.default_rng(0)
    size, cells = 256, 32
    fmap = rng.random((cells, cells))
    tile = (size // cells) ** 2 / size**2
    previous = np.zeros((size, size))
    for q in REVEAL_PERCENTAGES:
        mask = binary_mask(upsample_nearest(fmap, (size, size)), q)
        share = mask.mean()
        assert q / 100 - 1e-12 <= share <= q / 100 + tile, (q, share)
        assert np.all(mask >= previous)  # a level reveals everything the previous one did
        previous = mask
    # the revealed pixels are the highest cluster-map values first
    mask = binary_mask(upsample_nearest(fmap, (size, size)), 8.0)
    tiled = upsample_nearest(fmap, (size, size))
    assert tiled[mask == 1].min() >= tiled[mask == 0].max()


def test_black_outside_and_image_kept_inside() -> None:
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    rows, cols = np.mgrid[0:8, 0:8]
    fmap = -(rows + 1.01 * cols)  # highest at the top-left cell, all values distinct
    out = reveal_image(image, fmap, 2.0)  # 2 % of 4096 px: the top-left 8 x 8 cell and the next one
    assert out[32:, 32:].max() == 0  # far from them: black
    assert out[2, 2].min() > 100  # inside: most of the image survives the blur


def test_ties_at_the_threshold_are_revealed_like_the_authors_code() -> None:
    """``>=`` the percentile: a flat map reveals every pixel (heatmap_utils.computeMaskedImage)."""
    assert binary_mask(np.zeros((16, 16)), 2.0).mean() == 1.0


def test_sigma_table_and_non_multiple_sizes() -> None:
    assert [blur_sigma(256, h) for h in (128, 64, 32, 16, 8, 256, 100)] == [3, 6, 12, 16, 24, 3, 3]
    fmap = np.arange(9, dtype=float).reshape(3, 3)
    up = upsample_nearest(fmap, (10, 7))
    assert up.shape == (10, 7)
    assert up[0, 0] == 0 and up[9, 6] == 8 and up[3, 2] == fmap[0, 0] and up[4, 3] == fmap[1, 1]
    np.testing.assert_array_equal(upsample_nearest(fmap, (6, 6)), np.kron(fmap, np.ones((2, 2))))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        reveal_image(np.zeros((8, 8, 3)), np.zeros((2, 2)), 2.0)
    with pytest.raises(ValueError, match="percentage"):
        binary_mask(np.zeros((4, 4)), 0.0)
    with pytest.raises(ValueError, match="smaller"):
        upsample_nearest(np.zeros((8, 8)), (4, 4))
    assert GOLD_PERCENTAGES[-1] == 100.0


def test_png_bytes_decode_to_the_literal_reveal() -> None:
    """The PNG a round serves decodes (PIL, an independent decoder) to the reveal re-computed literally,
    pixel for pixel, as 8-bit RGB; encoding the same pixels twice gives the same bytes."""
    import io

    from PIL import Image

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    fmap = rng.random((8, 8))
    expected, _ = literal_reveal(image, fmap, 13.0)
    encoded = png_bytes(reveal_image(image, fmap, 13.0))
    with Image.open(io.BytesIO(encoded)) as decoded:
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (64, 64))
        np.testing.assert_array_equal(np.asarray(decoded), expected)
    assert 0 < expected.mean() < image.mean() / 2  # a partial reveal, not a trivial one
    assert encoded == png_bytes(expected.copy())

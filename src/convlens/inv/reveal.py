"""Deep Reveal images: an image revealed step by step through one INV cluster map.

Mask construction of the INV authors' game (Bianchi et al., IJCAI-24, ``heatmap_utils.computeMaskedImage``):

1. nearest-neighbour up-sampling of the h x w cluster map A_C to the image size by tiling every cell
   into an f x f block, f = H / h;
2. threshold t_q = the (100 - q)-th percentile of the up-sampled map (numpy's default linear
   interpolation, over all H x W pixels); binary mask M = [A_C >= t_q], so about q % of the pixels, the
   highest cluster-map values first;
3. soft mask = Gaussian blur of M with sigma chosen by the up-sampling factor (3, 6, 12, 16, 24 px for
   f = 2, 4, 8, 16, 32; 3 otherwise), truncated at 1.5 sigma, border mode "nearest" (scikit-image's
   default, which the authors called);
4. revealed image = image x soft mask, truncated to uint8 (pixels outside the mask are black).

Levels: q = 2, 4.5, 8, 13, 20, 30 % (``Q_DICTIONARY``); the level *index* 0..5 is what the game stores.

Choices where the authors' code is silent (it only runs square 256 px images with 16/32/64 px maps):
when H is not a multiple of h the up-sampling takes row ``floor(i h / H)`` (and likewise for columns),
which is the tiling whenever H is a multiple of h; the blur factor is ``H // h`` (rows), as in the code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = [
    "BLUR_TRUNCATE",
    "GOLD_PERCENTAGES",
    "REVEAL_PERCENTAGES",
    "binary_mask",
    "blur_sigma",
    "png_bytes",
    "reveal_image",
    "soft_mask",
    "upsample_nearest",
]

REVEAL_PERCENTAGES: tuple[float, ...] = (2.0, 4.5, 8.0, 13.0, 20.0, 30.0)
# Gold rounds (attention checks, our addition): the same construction with a large share revealed.
GOLD_PERCENTAGES: tuple[float, ...] = (50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
BLUR_SIGMA_BY_FACTOR: dict[int, float] = {2: 3.0, 4: 6.0, 8: 12.0, 16: 16.0, 32: 24.0}
DEFAULT_BLUR_SIGMA = 3.0
BLUR_TRUNCATE = 1.5


def upsample_nearest(cluster_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) by nearest neighbour: each cell tiled into an (H/h) x (W/w) block."""
    cluster_map = np.asarray(cluster_map, dtype=np.float64)
    if cluster_map.ndim != 2 or min(cluster_map.shape) < 1:
        raise ValueError(f"cluster map must be a non-empty 2-D array, got shape {cluster_map.shape}")
    height, width = size
    h, w = cluster_map.shape
    if height < h or width < w:
        raise ValueError(f"image {size} is smaller than the cluster map {cluster_map.shape}")
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return cluster_map[rows[:, None], cols[None, :]]


def blur_sigma(image_height: int, map_height: int) -> float:
    """Gaussian sigma of the soft mask for up-sampling factor ``image_height // map_height``."""
    return BLUR_SIGMA_BY_FACTOR.get(image_height // map_height, DEFAULT_BLUR_SIGMA)


def binary_mask(upsampled: np.ndarray, percent: float) -> np.ndarray:
    """M = [A >= (100 - percent)-th percentile of A]: float 0/1 mask of about ``percent`` % of the pixels."""
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"reveal percentage must be in (0, 100], got {percent}")
    threshold = np.percentile(upsampled, 100.0 - percent)
    return (upsampled >= threshold).astype(np.float64)


def soft_mask(cluster_map: np.ndarray, size: tuple[int, int], percent: float) -> np.ndarray:
    """Blurred mask in [0, 1] of shape ``size`` (steps 1-3 of the module docstring)."""
    from scipy.ndimage import gaussian_filter

    cluster_map = np.asarray(cluster_map)
    mask = binary_mask(upsample_nearest(cluster_map, size), percent)
    sigma = blur_sigma(size[0], cluster_map.shape[0])
    return gaussian_filter(mask, sigma=sigma, truncate=BLUR_TRUNCATE, mode="nearest")


def reveal_image(image: np.ndarray, cluster_map: np.ndarray, percent: float) -> np.ndarray:
    """``image`` (H, W, 3) uint8 revealed at ``percent`` % through ``cluster_map``: uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    mask = soft_mask(cluster_map, image.shape[:2], percent)
    return (image.astype(np.float64) * mask[:, :, None]).astype(np.uint8)


def reveal_levels(image: np.ndarray, cluster_map: np.ndarray, percentages: Sequence[float]) -> list[np.ndarray]:
    """One revealed image per level (increasing percentages)."""
    return [reveal_image(image, cluster_map, q) for q in percentages]


def png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps or text chunks): same pixels, same bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()

"""Heat-map overlays."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

__all__ = ["colorize", "overlay_blur", "overlay_map"]


def colorize(saliency: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) uint8 colours."""
    from matplotlib import colormaps

    rgba = colormaps[colormap](np.clip(np.nan_to_num(saliency), 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_map(image: Any, saliency: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a normalised (H, W) map over an RGB image (resized to the map if needed)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    h, w = saliency.shape
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    base = np.asarray(image, dtype=np.float32)
    heat = colorize(saliency, colormap).astype(np.float32)
    blended = (1 - alpha) * base + alpha * heat
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def overlay_blur(saliency: np.ndarray) -> np.ndarray:
    """Overlay smoothing of the INV explainer: Gaussian sigma 1, truncate 5.5 (scipy's default "reflect"
    border), then min-max back to [0, 1] (all zeros for a constant map). Shared with the global report."""
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(np.asarray(saliency, dtype=np.float64), sigma=1.0, truncate=5.5)
    lo, hi = blurred.min(), blurred.max()
    return (blurred - lo) / (hi - lo) if hi > lo else np.zeros_like(blurred)

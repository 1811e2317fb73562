"""Image loading with validation.

Every image becomes 8-bit RGB: EXIF orientation applied; grayscale, palette, CMYK and 16-bit images
converted; transparency composited onto white. Corrupt, truncated and non-image files, and
decompression bombs (more than ``max_pixels`` pixels), raise :class:`ImageLoadError` with one clear
message.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "ImageLoadError", "load_image"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit (~ 0.25 GiB of RGB at 8 bit)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageLoadError(ValueError):
    """An image that cannot be used: unreadable, corrupt, truncated, not an image, or too large."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any Pillow image mode."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, validate and convert an image file to 8-bit RGB (EXIF orientation applied)."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageLoadError(f"{path}: not a file")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                probe.verify()  # catches truncated/corrupt data for most formats
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                rgb = to_rgb(image).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{path}: image too large (decompression bomb guard, limit {max_pixels} pixels)") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not an image file Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({exc})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if rgb.width < 2 or rgb.height < 2:
        raise ImageLoadError(f"{path}: image is too small ({rgb.width}x{rgb.height})")
    return rgb

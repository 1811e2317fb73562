"""Image loading: every mode to RGB, EXIF orientation, clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from convlens.models.images import ImageLoadError, load_image


def test_modes_become_rgb(tmp_path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 6), 77).save(gray)
    assert np.asarray(load_image(gray))[0, 0].tolist() == [77, 77, 77]
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(rgba)  # fully transparent red -> white background
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(cmyk)
    pixel = np.asarray(load_image(cmyk))[3, 3]
    assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60  # red
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 8), 65535 // 2, dtype=np.uint16)).save(deep)
    assert load_image(deep).mode == "RGB" and abs(int(np.asarray(load_image(deep))[0, 0, 0]) - 128) <= 1


def test_exif_orientation_is_applied(tmp_path) -> None:
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_bad_files_raise_one_clear_error(tmp_path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(text)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(good, max_pixels=1000)

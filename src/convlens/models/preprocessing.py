"""Model preprocessing: resize the short side, centre-crop, normalise."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_PREPROCESSING", "Preprocessing"]

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``resize``, centre-crop ``size`` x ``size``, scale to [0,1], normalise.

    ``display(image)`` returns the cropped RGB image that the model sees, for overlays.
    """

    size: int = 224
    resize: int = 256
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def display(self, image: Image.Image) -> Image.Image:
        """Resized and centre-cropped RGB image (what the model sees, before normalisation).

        Exactly torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on PIL images (the pipeline timm and
        torchvision evaluate pretrained models with): the short side becomes ``resize``, the long side
        ``int(resize * long / short)`` (truncated), and the crop offsets are ``round((side - size) / 2)``.
        """
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        new_w, new_h = max(self.size, new_w), max(self.size, new_h)  # never smaller than the crop
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), _RESAMPLE[self.interpolation])
        left, top = round((new_w - self.size) / 2.0), round((new_h - self.size) / 2.0)
        return image.crop((left, top, left + self.size, top + self.size))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """(…, 3, H, W) tensor in [0,1] -> model input."""
        mean = torch.tensor(self.mean, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
        return (rgb - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> (…, 3, H, W) tensor in [0,1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, size, size) float tensor ready for the model."""
        array = np.asarray(self.display(image), dtype=np.float32) / 255.0
        return self.normalize(torch.from_numpy(array).permute(2, 0, 1).contiguous())

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


IMAGENET_PREPROCESSING = Preprocessing()

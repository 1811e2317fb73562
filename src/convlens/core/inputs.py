"""Validation of image batches given to methods."""

from __future__ import annotations

import torch

__all__ = ["as_image_batch"]


def as_image_batch(x: object) -> torch.Tensor:
    """``x`` as a (B, C, H, W) batch: a (C, H, W) image gains a batch axis; anything else is a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")
    return x

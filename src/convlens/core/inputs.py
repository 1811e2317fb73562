"""Validation of image batches given to methods, and clear errors when a model cannot take them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["as_image_batch", "explained_input", "input_mismatch"]


def as_image_batch(x: object) -> torch.Tensor:
    """``x`` as a (B, C, H, W) batch: a (C, H, W) image gains a batch axis; anything else is a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[-1] == 0 or x.shape[-2] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected a non-empty image batch, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")
    return x


def input_mismatch(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` cannot take ``x``, if its first convolution says so (channel count); else None."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None)
    if first is None or x.ndim < 2:
        return None
    name = next((n for n, m in model.named_modules() if m is first), "?")
    if first.in_channels != x.shape[1]:
        return (
            f"the model takes {first.in_channels}-channel images (its first convolution {name!r} has "
            f"{first.in_channels} input channels), got {x.shape[1]} channels (input shape {tuple(x.shape)})"
        )
    return None


@contextlib.contextmanager
def explained_input(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Turn a model's failure on ``x`` into a ValueError saying why, when the reason can be seen (e.g. a
    5-channel image for an RGB model), instead of an error from deep inside the model's code."""
    try:
        yield
    except RuntimeError as exc:
        reason = input_mismatch(model, x)
        if reason is None:
            raise
        raise ValueError(reason) from exc

"""MATLAB ``imresize(..., 'bicubic')`` in torch: Keys' cubic convolution (a = -0.5), mirrored borders.

ADVISE up-samples its group maps with it (imADVISE.m l.80, l.85), as the official MATLAB code does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["imresize_bicubic"]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """MATLAB ``imresize``'s cubic convolution kernel (Keys, a = -0.5)."""
    absx = x.abs()
    absx2, absx3 = absx**2, absx**3
    return (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1) + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * (
        (absx > 1) & (absx <= 2)
    )


def _resize_matrix(in_length: int, out_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out, in) weights of MATLAB ``imresize(..., 'bicubic')`` along one axis (``contributions`` of imresize.m:
    ``u = x/scale + 0.5 (1 - 1/scale)``, 4-tap cubic kernel, weights normalised, symmetric boundary).
    Down-scaling widens the kernel (MATLAB's antialiasing)."""
    scale = out_length / in_length
    width = 4.0 / scale if scale < 1 else 4.0
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if scale < 1 else _cubic(distance)
    weights = weights / weights.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(in_length), torch.arange(in_length - 1, -1, -1)])
    source = mirror[torch.remainder(indices.long() - 1, 2 * in_length)]
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, source, weights)
    return matrix.to(device=device, dtype=dtype)


def imresize_bicubic(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """MATLAB ``imresize(map, size, 'bicubic')`` of (..., h, w) maps (separable; float64 inside).

    Differs from ``torch.nn.functional.interpolate(mode="bicubic")`` (Keys a = -0.75, clamped border) in the
    kernel (a = -0.5, as PIL's bicubic) and the border (mirrored samples, renormalised weights).
    """
    rows = _resize_matrix(maps.shape[-2], size[0], torch.float64, maps.device)
    cols = _resize_matrix(maps.shape[-1], size[1], torch.float64, maps.device)
    return (rows @ maps.double() @ cols.T).to(maps.dtype if maps.is_floating_point() else torch.float32)

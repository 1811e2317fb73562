"""Map operations shared by methods, metrics and reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["minmax_normalize", "otsu_threshold", "upsample"]


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-6, dims: int = 2) -> torch.Tensor:
    """Min-max normalise over the last ``dims`` dimensions: ``(m - min) / (max(m - min) + eps)``.

    This is the SISE mask post-processing Omega (AAAI-21, after Eq. 8; code eps = 1e-6). A constant map
    becomes all zeros instead of NaN.
    """
    flat = maps.flatten(-dims)
    lo = flat.amin(dim=-1, keepdim=True)
    shifted = flat - lo
    hi = shifted.amax(dim=-1, keepdim=True)
    return (shifted / (hi + eps)).view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (..., h, w) maps to ``size`` (bilinear, ``align_corners=False`` like tf.image.resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*lead, *size)


def otsu_threshold(values: torch.Tensor, bins: int = 256, value_range: tuple[float, float] | None = None) -> float:
    """Otsu's threshold of ``values`` from a ``bins``-bin histogram (maximal between-class variance).

    Matches ``skimage.filters.threshold_otsu(values, nbins=bins)``: the histogram spans [min, max]
    (or ``value_range``); the returned threshold is the centre of the bin that ends the lower class.
    """
    v = values.detach().flatten().double().cpu()
    lo, hi = (float(v.min()), float(v.max())) if value_range is None else value_range
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    weight1 = torch.cumsum(hist, 0)
    weight2 = torch.cumsum(hist.flip(0), 0).flip(0)
    mean1 = torch.cumsum(hist * centres, 0) / weight1.clamp_min(1e-300)
    mean2 = (torch.cumsum((hist * centres).flip(0), 0) / weight2.clamp_min(1e-300).flip(0)).flip(0)
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(torch.argmax(variance))])

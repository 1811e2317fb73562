"""Map operations shared by methods, metrics and reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["minmax_exact", "minmax_normalize", "upsample"]


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


def minmax_exact(maps: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Min-max normalise over the last ``dims`` dimensions without epsilon: ``(m - min) / (max - min)``;
    a constant map becomes all zeros.

    MATLAB's ``rescale`` (ADVISE's group maps, imADVISE.m l.79-85) and the SISE authors' normalisation of
    each visualisation map ``V_b`` (their ``visualize_layers``). Unlike :func:`minmax_normalize`, a map's
    maximum becomes exactly 1.
    """
    flat = maps.flatten(-dims)
    lo = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return out.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (..., h, w) maps to ``size`` (bilinear, ``align_corners=False`` like tf.image.resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*lead, *size)

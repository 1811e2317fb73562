"""Otsu's threshold (maximal between-class variance of a histogram) and the SISE authors' variant of it.

Used by SISE's fusion gate (on visualisation maps) and Ada-SISE's selection (on mean gradients).
"""

from __future__ import annotations

import torch

from convlens.core.threads import limit_threads

__all__ = ["code_otsu_threshold", "otsu_threshold"]


@limit_threads()
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


@limit_threads()
def code_otsu_threshold(vis_map: torch.Tensor, bins: int = 256, tau: float = 1.5) -> float:
    """The SISE authors' modified Otsu threshold of a [0, 1] map (their code's ``otsu``, used by its fusion).

    1. ``q = round(bins · V)``; histogram of q with ``bins`` unit bins over ``[0, bins]`` (the last bin
       also holds ``q = bins``, as ``numpy.histogram`` does); class means use the bin indices.
    2. For ``j = 1 .. bins-1``: between-class variance ``w0 w1 (u0 - u1)^2`` of the split ``bin < j``.
    3. ``t`` = the arg-max (first one; an empty class gives NaN, and like ``numpy.argmax`` the first NaN
       wins — it never happens for a min-max normalised map).
    4. Bottleneck rule: if fewer than 10 % of the pixels fall in bins ``>= round(tau · t)`` (Python's
       round, half to even) the threshold is ``tau · t / bins``, else ``t / bins``.
    """
    q = torch.round(vis_map.detach().double().flatten().cpu() * bins)  # on the CPU, like otsu_threshold
    q = q[(q >= 0) & (q <= bins)]
    hist = torch.bincount(q.long().clamp_max(bins - 1), minlength=bins).double()
    levels = torch.arange(bins, dtype=torch.float64)
    total = hist.sum()
    w0 = torch.cumsum(hist, 0)[:-1]  # j = 1..bins-1: pixels in bins < j
    w1 = total - w0
    s0 = torch.cumsum(hist * levels, 0)[:-1]
    u0 = s0 / w0
    u1 = ((hist * levels).sum() - s0) / w1
    variance = torch.cat([torch.zeros(1, dtype=torch.float64), w0 * w1 * (u0 - u1) ** 2])
    nan = torch.isnan(variance)
    t = int(torch.nonzero(nan)[0]) if bool(nan.any()) else int(torch.argmax(variance))
    k = round(t * tau)
    if float(hist[int(k) :].sum()) < 0.1 * float(total):
        return t * tau / bins
    return t / bins

"""Peak counting with ``scipy.signal.find_peaks`` / MATLAB ``findpeaks`` semantics, batched in torch.

ADVISE's relevance of a unit is the number of peaks of its adaptive KDE (imADVISE.m l.39).
"""

from __future__ import annotations

import torch

__all__ = ["count_peaks"]


def count_peaks(values: torch.Tensor) -> torch.Tensor:
    """Number of local maxima along the last dimension, with ``scipy.signal.find_peaks`` semantics.

    A peak is a sample — or a flat run of equal samples, counted once — whose nearest different
    neighbours on *both* sides are strictly lower; the first and last samples are never peaks; NaN
    compares false (a NaN vector has no peak). Same as MATLAB ``findpeaks`` with default options.

    Vectorised: with ``s = sign(diff(values))``, a peak is a ``-1`` whose last preceding non-zero sign
    is ``+1``.
    """
    if values.shape[-1] < 3:
        return torch.zeros(values.shape[:-1], dtype=torch.long, device=values.device)
    steps = torch.diff(values, dim=-1)
    rising = steps > 0
    falling = steps < 0
    nonzero = steps != 0  # NaN counts as a non-zero, non-rising step: it breaks a plateau
    positions = torch.arange(steps.shape[-1], device=values.device).expand_as(steps)
    last_nonzero = torch.cummax(torch.where(nonzero, positions, -1), dim=-1).values
    previous = torch.cat([torch.full_like(last_nonzero[..., :1], -1), last_nonzero[..., :-1]], dim=-1)
    previous_rising = torch.gather(rising, -1, previous.clamp(min=0)) & (previous >= 0)
    return (falling & previous_rising).sum(dim=-1)

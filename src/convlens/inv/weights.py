"""INV's per-map weights and its two thresholds (Bianchi et al., IJCAI-24).

* :func:`channel_weights` — the generalised Grad-CAM coefficient of every feature map and its share of
  the layer total, ``w_k = 100 alpha_k / sum_k' alpha_k'`` (Grad-CAM Eq. 1, with the INV code's guided
  variant);
* :func:`prune_threshold` — ``d(K)``: maps with ``w_k <= d(K)`` are not clustered (the INV code's
  ``computeDiscardValue``);
* :func:`weak_cluster_threshold` — clusters with ``w_C < max(max_j w_Cj / 3, mean_j w_Cj / 2)`` are
  removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

__all__ = ["WEIGHTINGS", "Weighting", "channel_weights", "prune_threshold", "weak_cluster_threshold"]

Weighting = Literal["guided", "gradcam"]
WEIGHTINGS: tuple[str, ...] = ("guided", "gradcam")


def channel_weights(
    activations: torch.Tensor, gradients: torch.Tensor, weighting: Weighting = "guided"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map coefficients and their percentages of the layer total.

    Args:
        activations: (B, K, h, w) feature maps ``A``.
        gradients: (B, K, h, w) ``dy^c / dA`` of the target logit.
        weighting: ``"guided"``: ``alpha_k = mean_ij 1[A_ij>0] 1[G_ij>0] G_ij`` (INV code, >= 0 by
            construction); ``"gradcam"``: ``alpha_k = mean_ij G_ij`` (Grad-CAM Eq. 1), whose negative
            values are clipped to 0 before the percentages (a negative share of a total is meaningless).

    Returns:
        ``(alpha, percent)``, both (B, K): the raw coefficients (negative allowed for ``"gradcam"``) and, in
        float64, ``w_k = 100 max(alpha_k, 0) / sum_k' max(alpha_k', 0)`` (all zeros if the sum is 0).
    """
    if activations.shape != gradients.shape or activations.ndim != 4:
        raise ValueError(
            f"activations {tuple(activations.shape)} and gradients {tuple(gradients.shape)} must both be (B, K, h, w)"
        )
    if weighting == "guided":
        guided = gradients * (activations > 0) * (gradients > 0)
        alpha = guided.mean(dim=(2, 3))
    elif weighting == "gradcam":
        alpha = gradients.mean(dim=(2, 3))
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    positive = alpha.clamp_min(0).double()
    total = positive.sum(dim=1, keepdim=True)
    percent = torch.where(total > 0, 100.0 * positive / total.clamp_min(1e-300), torch.zeros_like(positive))
    return alpha, percent


def prune_threshold(num_channels: int) -> float:
    """``d(K)`` of the pruning rule (the INV code's ``computeDiscardValue``): keep map k iff ``w_k > d(K)``.

    0.175 % for K >= 512, 0.35 for K >= 256, 0.7 for K >= 128, 1.4 for K >= 64, else 76.8 / K.
    """
    if num_channels < 1:
        raise ValueError(f"a layer needs at least one channel, got {num_channels}")
    for minimum, threshold in ((512, 0.175), (256, 0.35), (128, 0.7), (64, 1.4)):
        if num_channels >= minimum:
            return threshold
    return 76.8 / num_channels


def weak_cluster_threshold(cluster_weights: Sequence[float] | np.ndarray) -> float:
    """The weak-cluster bound: clusters with ``w_C < max(max w / 3, mean w / 2)`` are removed."""
    values = np.asarray(cluster_weights, dtype=np.float64)
    if values.size == 0:
        return 0.0
    return float(max(values.max() / 3.0, values.mean() / 2.0))

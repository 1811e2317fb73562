"""Grad-CAM (Selvaraju et al., ICCV 2017)."""

from __future__ import annotations

import torch

from convlens.methods.base import GradientCAM

__all__ = ["GradCAM"]


class GradCAM(GradientCAM):
    """Grad-CAM: ``L^c = ReLU(sum_k alpha_k^c A^k)`` with ``alpha_k^c = (1/Z) sum_ij dy^c/dA^k_ij`` (Eqs. 1-2)."""

    name = "gradcam"
    paper = "Selvaraju et al., Grad-CAM, ICCV 2017"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3))

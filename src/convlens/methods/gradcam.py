"""Grad-CAM (Selvaraju et al., ICCV 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convlens.core.params import MethodParams
from convlens.methods.base import GradientCAM

__all__ = ["GradCAM", "GradCAMParams"]


@dataclass(frozen=True)
class GradCAMParams(MethodParams):
    """Grad-CAM has no knobs of its own (its layers and score are explainer arguments)."""

    method = "gradcam"


class GradCAM(GradientCAM):
    """Grad-CAM: ``L^c = ReLU(sum_k alpha_k^c A^k)`` with ``alpha_k^c = (1/Z) sum_ij dy^c/dA^k_ij`` (Eqs. 1-2)."""

    name = "gradcam"
    paper = "Selvaraju et al., Grad-CAM, ICCV 2017"
    Params = GradCAMParams

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(2, 3))

"""Grad-CAM++ (Chattopadhay et al., WACV 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convlens.core.params import MethodParams
from convlens.methods.base import GradientCAM

__all__ = ["GradCAMpp", "GradCAMppParams"]


@dataclass(frozen=True)
class GradCAMppParams(MethodParams):
    """Grad-CAM++ has no knobs of its own (its layers and score are explainer arguments)."""

    method = "gradcampp"


class GradCAMpp(GradientCAM):
    """Grad-CAM++: ``w_k = sum_ij a_ij^k ReLU(dY/dA_ij^k)`` with the closed form of Eq. 19 (exponential
    score, so higher derivatives are powers of the first):
    ``a_ij^k = g^2 / (2 g^2 + sum_ab A_ab^k g^3)``, and ``a = 0`` where ``g = 0``."""

    name = "gradcampp"
    paper = "Chattopadhay et al., Grad-CAM++, WACV 2018"
    Params = GradCAMppParams
    eps = 1e-7

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        g2 = gradients.pow(2)
        g3 = gradients.pow(3)
        act_sum = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + act_sum * g3 + self.eps)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (alpha * torch.relu(gradients)).sum(dim=(2, 3))

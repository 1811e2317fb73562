"""LayerCAM (Jiang et al., IEEE TIP 2021)."""

from __future__ import annotations

import torch

from convlens.methods.base import GradientCAM

__all__ = ["LayerCAM"]


class LayerCAM(GradientCAM):
    """LayerCAM: ``M = ReLU(sum_k ReLU(dY/dA^k) ⊙ A^k)`` — spatial, element-wise weights (Eqs. 5-6)."""

    name = "layercam"
    paper = "Jiang et al., LayerCAM, IEEE TIP 2021"

    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (torch.relu(gradients) * activations).sum(dim=1)

"""LayerCAM (Jiang et al., IEEE TIP 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convlens.core.params import MethodParams
from convlens.methods.base import GradientCAM

__all__ = ["LayerCAM", "LayerCAMParams"]


@dataclass(frozen=True)
class LayerCAMParams(MethodParams):
    """LayerCAM has no knobs of its own (its layers and score are explainer arguments)."""

    method = "layercam"


class LayerCAM(GradientCAM):
    """LayerCAM: ``M = ReLU(sum_k ReLU(dY/dA^k) ⊙ A^k)`` — spatial, element-wise weights (Eqs. 5-6)."""

    name = "layercam"
    paper = "Jiang et al., LayerCAM, IEEE TIP 2021"
    Params = LayerCAMParams

    def layer_map(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (torch.relu(gradients) * activations).sum(dim=1)

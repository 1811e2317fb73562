"""Independent re-computations used by the method tests (plain autograd, no convlens hooks)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_forward_with_layer(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """TinyCNN forward written out by hand; returns (logits, output of ``layer``) with the graph kept."""
    b1 = model.block1(x.clone())
    b2 = model.block2(model.pool1(b1).clone())
    b3 = model.block3(model.pool2(b2).clone())
    logits = model.fc(torch.flatten(model.gap(b3), 1))
    return logits, {"block1": b1, "block2": b2, "block3": b3}[layer]


def tiny_activation_and_gradient(model: nn.Module, x: torch.Tensor, layer: str, class_id: int
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation (K, h, w) of ``layer`` for one image and d logit[class_id] / d activation."""
    logits, act = tiny_forward_with_layer(model.eval(), x[None], layer)
    (grad,) = torch.autograd.grad(logits[0, class_id], act)
    return act[0].detach(), grad[0]


def bilinear(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))

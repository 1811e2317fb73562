"""Grad-CAM++: literal re-computation of Eq. 19, pytorch-grad-cam cross-check, batch equivalence."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import torchvision.models as tvm
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from convlens.methods.gradcampp import GradCAMpp


def test_gradcampp_equals_literal_formula(
    reference: ModuleType, tiny_cnn: nn.Module, tiny_images: torch.Tensor
) -> None:
    result = GradCAMpp(tiny_cnn, layers="block3").explain(tiny_images, [0, 1, 2])
    for i in range(3):
        act, grad = reference.tiny_activation_and_gradient(tiny_cnn, tiny_images[i], "block3", i)
        cam = torch.zeros(act.shape[1:])
        for k in range(act.shape[0]):
            weight = 0.0
            for a in range(act.shape[1]):
                for b in range(act.shape[2]):
                    g = float(grad[k, a, b])
                    if g == 0:
                        continue
                    alpha = g**2 / (2 * g**2 + float(act[k].sum()) * g**3 + 1e-7)
                    weight += alpha * max(g, 0.0)
            cam += weight * act[k]
        torch.testing.assert_close(result.maps[i], reference.bilinear(torch.relu(cam), (32, 32)), rtol=1e-4, atol=1e-6)


def test_batch_equals_stacked_single_results(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = GradCAMpp(tiny_cnn, layers="block2")
    batch = explainer.explain(tiny_images)
    for i in range(3):
        torch.testing.assert_close(batch.maps[i], explainer.explain(tiny_images[i]).maps[0], rtol=1e-4, atol=1e-6)


def test_matches_pytorch_grad_cam(reference: ModuleType) -> None:
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ours = GradCAMpp(model, layers="layer3").explain(x, [3, 7]).normalized
    with GradCAMPlusPlus(model=model, target_layers=[model.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
    for i in range(2):
        assert reference.pearson(ours[i], torch.from_numpy(np.asarray(theirs[i]))) >= 0.99

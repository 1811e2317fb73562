"""Grad-CAM: literal re-computation, pytorch-grad-cam cross-check, batch equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from pytorch_grad_cam import GradCAM as PGCGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from _reference import bilinear, pearson, tiny_activation_and_gradient
from convlens.methods.gradcam import GradCAM


def test_gradcam_equals_literal_formula(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    targets = [0, 2, 4]
    result = GradCAM(tiny_cnn, layers="block2").explain(tiny_images, targets)
    for i, c in enumerate(targets):
        act, grad = tiny_activation_and_gradient(tiny_cnn, tiny_images[i], "block2", c)
        cam = torch.zeros(act.shape[1:])
        for k in range(act.shape[0]):
            cam += grad[k].mean() * act[k]
        expected = bilinear(torch.relu(cam), (32, 32))
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    assert result.targets.tolist() == targets
    assert result.forward_passes == 1 + 3 and result.backward_passes == 3


def test_batch_equals_stacked_single_results(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = GradCAM(tiny_cnn, layers=["block2", "block3"])
    batch = explainer.explain(tiny_images, [1, 2, 3])
    for i, c in enumerate([1, 2, 3]):
        single = explainer.explain(tiny_images[i : i + 1], c)
        torch.testing.assert_close(batch.maps[i], single.maps[0], rtol=1e-4, atol=1e-6)


def test_matches_pytorch_grad_cam() -> None:
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ours = GradCAM(model, layers="layer3").explain(x, [3, 7]).normalized
    with PGCGradCAM(model=model, target_layers=[model.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
    for i in range(2):
        assert pearson(ours[i], torch.from_numpy(np.asarray(theirs[i]))) >= 0.99


def test_disconnected_layer_is_a_clear_error(tiny_cnn: nn.Module) -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_cnn
            self.unused = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused(x)
            return self.body(x)

    with pytest.raises(ValueError, match="does not depend"):
        GradCAM(TwoHeads(), layers="unused").explain(torch.randn(1, 3, 32, 32))

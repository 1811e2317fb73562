"""LayerCAM: literal re-computation, pytorch-grad-cam cross-check, batch equivalence."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import torchvision.models as tvm
from pytorch_grad_cam import LayerCAM as PGCLayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from convlens.methods.layercam import LayerCAM


def test_layercam_equals_literal_formula(reference: ModuleType, tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    result = LayerCAM(tiny_cnn, layers="block1").explain(tiny_images, [4, 3, 2])
    for i, c in enumerate([4, 3, 2]):
        act, grad = reference.tiny_activation_and_gradient(tiny_cnn, tiny_images[i], "block1", c)
        cam = torch.zeros(act.shape[1:])
        for k in range(act.shape[0]):
            cam += torch.clamp(grad[k], min=0) * act[k]
        torch.testing.assert_close(result.maps[i], reference.bilinear(torch.relu(cam), (32, 32)), rtol=1e-4, atol=1e-6)


def test_batch_equals_stacked_single_results(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = LayerCAM(tiny_cnn, layers="blocks")
    batch = explainer.explain(tiny_images, 1)
    for i in range(3):
        torch.testing.assert_close(batch.maps[i], explainer.explain(tiny_images[i], 1).maps[0], rtol=1e-4, atol=1e-6)
    assert list(batch.layer_maps) == ["block1", "block2", "block3"]


def test_matches_pytorch_grad_cam(reference: ModuleType) -> None:
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ours = LayerCAM(model, layers="layer2").explain(x, [3, 7]).normalized
    with PGCLayerCAM(model=model, target_layers=[model.layer2]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
    for i in range(2):
        assert reference.pearson(ours[i], torch.from_numpy(np.asarray(theirs[i]))) >= 0.99

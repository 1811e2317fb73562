"""Grad-CAM: literal re-computation, several layers averaged literally, pytorch-grad-cam cross-check, batch
equivalence; the Grad-CAM family takes no knobs."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from pytorch_grad_cam import GradCAM as PGCGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from convlens.core.params import ParamError
from convlens.methods import create
from convlens.methods.base import combine_layer_maps
from convlens.methods.gradcam import GradCAM


def test_gradcam_equals_literal_formula(reference: ModuleType, tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    targets = [0, 2, 4]
    result = GradCAM(tiny_cnn, layers="block2").explain(tiny_images, targets)
    for i, c in enumerate(targets):
        act, grad = reference.tiny_activation_and_gradient(tiny_cnn, tiny_images[i], "block2", c)
        cam = torch.zeros(act.shape[1:])
        for k in range(act.shape[0]):
            cam += grad[k].mean() * act[k]
        expected = reference.bilinear(torch.relu(cam), (32, 32))
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-6)
    assert result.targets.tolist() == targets
    assert result.forward_passes == 3 + 3 and result.backward_passes == 3  # logits, then forward + backward


def test_batch_equals_stacked_single_results(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = GradCAM(tiny_cnn, layers=["block2", "block3"])
    batch = explainer.explain(tiny_images, [1, 2, 3])
    for i, c in enumerate([1, 2, 3]):
        single = explainer.explain(tiny_images[i : i + 1], c)
        torch.testing.assert_close(batch.maps[i], single.maps[0], rtol=1e-4, atol=1e-6)


def test_matches_pytorch_grad_cam(reference: ModuleType) -> None:
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ours = GradCAM(model, layers="layer3").explain(x, [3, 7]).normalized
    with PGCGradCAM(model=model, target_layers=[model.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
    for i in range(2):
        assert reference.pearson(ours[i], torch.from_numpy(np.asarray(theirs[i]))) >= 0.99


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


def test_several_layers_are_averaged_after_min_max(reference: ModuleType, tiny_cnn: nn.Module,
                                                    tiny_images: torch.Tensor) -> None:
    """pytorch-grad-cam's aggregation: each layer's ReLU(cam) up-sampled, min-max normalised
    ``(m - min) / (max - min + 1e-6)``, then the mean over layers; the raw up-sampled maps in layer_maps."""
    result = GradCAM(tiny_cnn, layers=["block1", "block3"]).explain(tiny_images, [0, 1, 2])
    for i, c in enumerate([0, 1, 2]):
        normalised = []
        for layer in ("block1", "block3"):
            act, grad = reference.tiny_activation_and_gradient(tiny_cnn, tiny_images[i], layer, c)
            cam = torch.relu(sum(grad[k].mean() * act[k] for k in range(act.shape[0])))
            up = reference.bilinear(cam, (32, 32))
            torch.testing.assert_close(result.layer_maps[layer][i], up, rtol=1e-4, atol=1e-6)
            normalised.append((up - up.min()) / (up.max() - up.min() + 1e-6))
        torch.testing.assert_close(result.maps[i], (normalised[0] + normalised[1]) / 2, rtol=1e-4, atol=1e-6)


def test_combine_layer_maps_by_hand() -> None:
    low = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])  # (B=1, 2, 2): min-max -> 0, 0.25, 0.5, 1 (up to 1e-6)
    high = torch.tensor([[[1.0, 1.0], [1.0, 3.0]]])  # -> 0, 0, 0, 1
    final, upsampled = combine_layer_maps({"low": low, "high": high}, (2, 2))
    expected = torch.tensor([[[0.0, 0.125], [0.25, 1.0]]])
    torch.testing.assert_close(final, expected, atol=1e-6, rtol=0)
    assert upsampled["low"] is low and upsampled["high"] is high  # already at the input size
    single, layers = combine_layer_maps({"low": low}, (2, 2))
    assert torch.equal(single, low) and list(layers) == ["low"]  # one layer: its raw map


def test_the_family_takes_no_knobs(tiny_cnn: nn.Module) -> None:
    for name in ("gradcam", "gradcampp", "layercam", "scorecam"):
        with pytest.raises(ParamError, match=rf"^{name} has no parameter 'alpha'; parameters: none$"):
            create(name, tiny_cnn, alpha=1)
        assert set(create(name, tiny_cnn).params()) <= {"score", "batch_size", "layers"}

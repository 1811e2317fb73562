"""Score-CAM: per-paper re-computation (one mask at a time), pytorch-grad-cam cross-check, batches."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import torchvision.models as tvm
from pytorch_grad_cam import ScoreCAM as PGCScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from convlens.methods.scorecam import ScoreCAM


def test_scorecam_follows_algorithm_1(reference: ModuleType, tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    result = ScoreCAM(tiny_cnn, layers="block2", batch_size=5).explain(tiny_images[:2], [1, 3])
    for i, c in enumerate([1, 3]):
        x = tiny_images[i]
        with torch.no_grad():
            act = tiny_cnn.block2(tiny_cnn.pool1(tiny_cnn.block1(x[None].clone())))[0]
            scores = []
            for k in range(act.shape[0]):
                up = reference.bilinear(act[k], (32, 32))
                h = (up - up.min()) / (up.max() - up.min() + 1e-8)
                scores.append(float(tiny_cnn((x * h)[None])[0, c]))
            alpha = torch.softmax(torch.tensor(scores), 0)
            cam = torch.relu(sum(alpha[k] * act[k] for k in range(act.shape[0])))
        torch.testing.assert_close(result.maps[i], reference.bilinear(cam, (32, 32)), rtol=1e-4, atol=1e-6)
    assert result.forward_passes == 1 + 2 * 16 + 2


def test_batch_equals_stacked_single_results(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    explainer = ScoreCAM(tiny_cnn, layers="block3", batch_size=8)
    batch = explainer.explain(tiny_images)
    for i in range(3):
        torch.testing.assert_close(batch.maps[i], explainer.explain(tiny_images[i]).maps[0], rtol=1e-4, atol=1e-6)


def test_matches_pytorch_grad_cam(reference: ModuleType) -> None:
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ours = ScoreCAM(model, layers="layer3", batch_size=64).explain(x, [3, 7]).normalized
    with PGCScoreCAM(model=model, target_layers=[model.layer3]) as cam:
        cam.batch_size = 64
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(7)])
    for i in range(2):
        assert reference.pearson(ours[i], torch.from_numpy(np.asarray(theirs[i]))) >= 0.99

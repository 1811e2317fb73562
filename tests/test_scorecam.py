"""Score-CAM: per-paper re-computation (one mask at a time), pytorch-grad-cam cross-check, batches."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import torchvision.models as tvm
from pytorch_grad_cam import ScoreCAM as PGCScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from convlens.methods.scorecam import ChannelMasks, ScoreCAM


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


def _literal_scorecam(reference: ModuleType, model: nn.Module, x: torch.Tensor, c: int) -> torch.Tensor:
    """Algorithm 1 on block3, one mask (and one forward) per channel, every channel scored."""
    with torch.no_grad():
        act = model.block3(model.pool2(model.block2(model.pool1(model.block1(x[None].clone())))))[0]
        scores = []
        for k in range(act.shape[0]):
            up = reference.bilinear(act[k], (32, 32))
            h = (up - up.min()) / (up.max() - up.min() + 1e-8)
            scores.append(float(model((x * h)[None])[0, c]))
        alpha = torch.softmax(torch.tensor(scores), 0)
        return reference.bilinear(torch.relu(sum(alpha[k] * act[k] for k in range(act.shape[0]))), (32, 32))


def test_all_zero_masks_are_scored_once(reference: ModuleType, make_model, tiny_images: torch.Tensor) -> None:
    """Dead channels (all-zero maps) give the all-zero mask: one forward of the zero image scores them all, and
    the map is the literal Algorithm 1's, which scores every channel."""
    model = make_model()
    with torch.no_grad():
        model.block3[0].weight[:12] = 0
        model.block3[0].bias[:12] = -1
    result = ScoreCAM(model, layers="block3", batch_size=5).explain(tiny_images, [0, 2, 4])
    zero = result.extras["zero_masks"]["block3"]
    assert all(n >= 12 for n in zero)
    for i, c in enumerate([0, 2, 4]):
        torch.testing.assert_close(result.maps[i], _literal_scorecam(reference, model, tiny_images[i], c),
                                   rtol=1e-4, atol=1e-6)
    assert result.forward_passes == 1 + 3 + sum(32 - n + 1 for n in zero)  # logits, activations, masks


def test_channel_masks_stream_full_batches_of_the_nonzero_masks() -> None:
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(23, 4, 4, generator=g)
    dead = [0, 3, 4, 5, 11, 17, 22]
    maps[dead] = torch.tensor([0.0, 0.0, 6.0, 0.0, 2.5, 0.0, 0.0])[:, None, None]
    masks = ChannelMasks(maps, (8, 8), batch_size=4)
    chunks = list(masks)
    assert [c.shape[0] for c in chunks] == [4, 4, 4, 4]
    assert masks.zero == dead and masks.scored == [k for k in range(23) if k not in dead]
    up = torch.nn.functional.interpolate(maps[masks.scored][:, None], size=(8, 8), mode="bilinear",
                                         align_corners=False)[:, 0]
    lo = up.flatten(1).amin(1)[:, None, None]
    hi = up.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(torch.cat(chunks)[:, 0], (up - lo) / (hi - lo + 1e-8))


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

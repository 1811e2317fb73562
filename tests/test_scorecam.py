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
    assert result.forward_passes == 2 + 2 * 16 + 2


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
    assert result.forward_passes == 3 + 3 + sum(32 - n + 1 for n in zero)  # logits, activations, masks


def test_channel_masks_stream_full_batches_of_the_nonzero_masks() -> None:
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(23, 4, 4, generator=g)
    dead = [0, 3, 4, 5, 11, 17, 22]
    maps[dead] = torch.tensor([0.0, 0.0, 6.0, 0.0, 2.5, 0.0, 0.0])[:, None, None]
    masks = ChannelMasks(maps, (8, 8), batch_size=4)
    chunks = list(masks)
    assert [c.shape[0] for c in chunks] == [4, 4, 4, 4, 1]  # 16 non-zero masks, then the zero image's
    assert masks.zero == dead and masks.scored == [k for k in range(23) if k not in dead]
    up = torch.nn.functional.interpolate(maps[masks.scored][:, None], size=(8, 8), mode="bilinear",
                                         align_corners=False)[:, 0]
    lo = up.flatten(1).amin(1)[:, None, None]
    hi = up.flatten(1).amax(1)[:, None, None]
    streamed = torch.cat(chunks)[:, 0]
    torch.testing.assert_close(streamed[:16], (up - lo) / (hi - lo + 1e-8))
    assert not streamed[16].any()


def test_zero_image_shares_the_last_chunk_and_no_zero_mask_without_dead_channels() -> None:
    maps = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(3))
    assert [c.shape[0] for c in ChannelMasks(maps, (8, 8), batch_size=4)] == [4, 2]
    maps[1] = 0
    chunks = list(ChannelMasks(maps, (8, 8), batch_size=4))
    assert [c.shape[0] for c in chunks] == [4, 2]  # 5 masks and the zero image: no forward of its own
    assert not chunks[-1][-1].any() and all(c.amax() > 0 for c in chunks[0])


def test_copies_of_one_image_share_the_masked_forwards_and_equal_single_calls(make_model,
                                                                              tiny_images: torch.Tensor) -> None:
    """The evaluation explains one image for its k classes as k ``expand``-ed copies: one activation forward
    and one stream of masked forwards serve every class, and each map is bitwise the single call's."""
    model = make_model()
    with torch.no_grad():
        model.block3[0].weight[:12] = 0  # dead channels: the zero image is scored too
        model.block3[0].bias[:12] = -1
    explainer = ScoreCAM(model, layers="block3", batch_size=5)
    image, classes = tiny_images[1], [0, 3, 4]
    batch = explainer.explain(image[None].expand(3, -1, -1, -1), classes)
    singles = [explainer.explain(image[None], [c]) for c in classes]
    for i, single in enumerate(singles):
        assert torch.equal(batch.maps[i], single.maps[0])
    zero = batch.extras["zero_masks"]["block3"]
    assert zero == [zero[0]] * 3 and zero[0] >= 12
    assert singles[0].forward_passes == 1 + 1 + (32 - zero[0]) + 1
    assert batch.forward_passes == 3 + 1 + (32 - zero[0]) + 1  # three logits rows; activations and masks once
    # a copy (not a stride-0 view) of the same image, between two other images, is found too: the batch equals
    # batches of the distinct images (activations of a batch of 3 images, as the explainer computes them)
    mixed = torch.stack([image, tiny_images[0], image.clone(), tiny_images[2]])
    together = explainer.explain(mixed, [0, 1, 3, 2])
    distinct = torch.stack([image, tiny_images[0], tiny_images[2]])
    first, second = explainer.explain(distinct, [0, 1, 2]), explainer.explain(distinct, [3, 1, 2])
    for i, expected in enumerate([first.maps[0], first.maps[1], second.maps[0], first.maps[2]]):
        assert torch.equal(together.maps[i], expected)
    assert together.forward_passes == first.forward_passes + 1  # the copy costs its logits row only


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

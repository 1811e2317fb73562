"""Activations and gradients: correct values, in-place safety, state restored, no leaks."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from torch import nn

from convlens.core.hooks import LayerCapture, forward_with_grads
from convlens.core.targets import class_scores
from convlens.methods.gradcam import GradCAM


def _manual_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of TinyCNN written out by hand, returning (logits, output of block2.1 = BatchNorm)."""
    h = model.pool1(model.block1(x))
    bn_out = model.block2[1](model.block2[0](h))
    h = model.pool2(torch.relu(bn_out))
    h = model.block3(h)
    return model.fc(torch.flatten(model.gap(h), 1)), bn_out


def test_gradients_match_manual_autograd_despite_inplace_relu(tiny_cnn: nn.Module, tiny_images: torch.Tensor) -> None:
    # block2.1 (BatchNorm) is followed by an in-place ReLU: the hook must keep the pre-ReLU values.
    ids = torch.tensor([0, 3, 1])
    logits, acts, grads = forward_with_grads(tiny_cnn, tiny_images, ["block2.1"], lambda lg: class_scores(lg, ids))
    x = tiny_images.clone()
    ref_logits, bn_out = _manual_forward(tiny_cnn, x)
    (ref_grad,) = torch.autograd.grad(class_scores(ref_logits, ids).sum(), bn_out)
    torch.testing.assert_close(logits, ref_logits.detach())
    torch.testing.assert_close(acts["block2.1"], bn_out.detach())
    assert (acts["block2.1"] < 0).any()  # really pre-ReLU
    torch.testing.assert_close(grads["block2.1"], ref_grad)


def test_state_restored_on_exit_and_on_error(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    for p in tiny_cnn.block1.parameters():
        p.requires_grad_(False)
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    with LayerCapture(tiny_cnn, ["block2"]):
        assert not tiny_cnn.training
    assert tiny_cnn.training and all(m.training for m in tiny_cnn.modules())
    with pytest.raises(RuntimeError, match="boom"), LayerCapture(tiny_cnn, ["block2", "block3"]):
        raise RuntimeError("boom")
    assert tiny_cnn.training
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
    # frozen weights do not prevent gradients w.r.t. activations
    _, _, grads = forward_with_grads(tiny_cnn, torch.randn(1, 3, 32, 32), ["block1"], lambda lg: lg[:, 0])
    assert grads["block1"].abs().sum() > 0
    assert tiny_cnn.training and [p.requires_grad for p in tiny_cnn.parameters()] == flags


def test_error_in_forward_restores_state(tiny_cnn: nn.Module) -> None:
    tiny_cnn.train()
    with pytest.raises(RuntimeError):
        forward_with_grads(tiny_cnn, torch.randn(1, 5, 32, 32), ["block1"], lambda lg: lg[:, 0])  # wrong channels
    assert tiny_cnn.training and all(not m._forward_hooks for m in tiny_cnn.modules())


def test_no_memory_growth_over_200_calls(tiny_cnn: nn.Module) -> None:
    explainer = GradCAM(tiny_cnn, layers=["block2", "block3"])
    x = torch.randn(4, 3, 32, 32)
    for _ in range(20):  # warm-up: allocator pools, lazy inits
        explainer.explain(x)
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    live_before = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))
    for _ in range(200):
        explainer.explain(x)
    gc.collect()
    growth_mb = (process.memory_info().rss - before) / 2**20
    live_after = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))
    assert live_after <= live_before
    assert growth_mb < 30, f"RSS grew by {growth_mb:.1f} MB over 200 calls"
    assert all(not m._forward_hooks for m in tiny_cnn.modules())
